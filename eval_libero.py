"""Evaluate token policies closed-loop in LIBERO, every decoding mode on the same trials.

    python eval_libero.py --task_suite libero_spatial --policy policy.pt --draft draft.pt \\
        --mode dense,rsd,rsd+adaptive --num_trials 20 --workers 2 --json eval.json --plot eval.png
    python eval_libero.py ... --parallel_policy policy_parallel.pt --mode all,expert   # every mode, and the expert

A mode spec is MODE, MODE@ACCEPTANCE (``rsd@relaxed``: that mode's acceptance rule, overriding
``--acceptance``) and, for the speculative modes, a trailing ``:K`` (``rsd:3``: the draft
proposes K layers, overriding ``--k``; ``heads:2``: the self-drafting heads of ``--heads`` propose 2
layers per pass) and, for the tree mode, a trailing ``/C`` (``tree:3/2``: C candidates per proposed
layer, overriding ``--candidates``), so several rules and depths are compared in one run;
``expert`` adds the scripted expert as the upper reference.

Trial i of a task starts from the benchmark's init state i (0-19 are never used for training
data), in a freshly built simulation whose fixture placement is drawn from the trial's seed
(``LiberoEnv.reset``): every mode meets the very same scene in trial i, and a rerun meets it
again (``--reuse_env``: one simulation per task, reset between trials; the fixtures' placement
then depends on the trials before). It runs the settle steps and gets the suite's standard
step limit; the policy re-plans every ``--replan_steps``. Success comes only from
``env.check_success()``. An exception inside a trial is counted and reported as an error (never
as a success), and the evaluation goes on. Within a task the modes run trial by trial (trial 0
in every mode, then trial 1, ...), so a change of machine load weighs on every mode alike; with
``--workers N`` the tasks are shared among N processes, each running every mode on its tasks.

The table pairs the modes trial by trial (``results.py``); ``report_libero.py`` re-reports,
plots, compares and pools saved results.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

import cli
import collect_actions as ca
import workers
from cli import arg
from fileio import check_outputs
from results import ModeResult, report, summarize
from rsd_engine_core import (HEADS_MODES, SPECULATIVE_MODES, DecodingArgs, EnginePolicy, base_mode, build_engine,
                             check_action_noise, parse_modes)

log = logging.getLogger("eval_libero")

# rows that are not the engine's decoding modes: the scripted expert (the upper reference) and a
# policy served by openpi's websocket server (--host, --port; the same trials, latency = round trip)
EXTRA_MODES = ("expert", "openpi")


def mode_list(value: str) -> list[str]:
    """--mode: 'all' (every engine mode), or a comma list of MODE[@ACCEPTANCE][:K][/C] and 'expert'."""
    import argparse

    try:
        return parse_modes(value, EXTRA_MODES + ("all",))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --backend ray: trials per shard (one engine and env construction per shard)
RAY_SHARD_TRIALS = 5


@dataclass
class EvalArgs(DecodingArgs, workers.WorkersArgs):
    # what to evaluate
    task_suite: str = arg("libero_spatial", "LIBERO suite", choices=list(ca.SUITES))
    task_id: list[int] | str = arg("all", "a task id, a comma list of ids, or 'all'", type=ca.parse_task_ids)
    num_trials: int = arg(20, "trials per task; trial i starts from the held-out init state i (0-19)")
    mode: list[str] = arg(None, "'all' (dense, parallel, rsd, adaptive, rsd+adaptive, tree, tree+adaptive, heads, "
                                "heads+adaptive, rsd+heads, rsd+heads+adaptive; parallel only with --parallel_policy, "
                                "the heads modes only with "
                                "--heads), or a comma list of MODE[@ACCEPTANCE][:K][/C] and 'expert', "
                                "e.g. dense,rsd:3,rsd+adaptive@relaxed,expert",
                          factory=lambda: ["rsd"], type=mode_list)
    # models
    policy: str | None = arg(None, "main policy checkpoint (variant ar), or 'openpi' for a policy served by "
                                   "openpi's websocket server (--host, --port): the mode 'openpi'", metavar="PATH")
    draft: str | None = arg(None, "draft checkpoint (the speculative modes: rsd, tree and their +adaptive)", metavar="PATH")
    parallel_policy: str | None = arg(None, "parallel-variant policy checkpoint (mode parallel)", metavar="PATH")
    heads: str | None = arg(None, "self-drafting heads checkpoint (train_draft.py --heads; the modes heads, "
                                  "heads+adaptive, rsd+heads, rsd+heads+adaptive)", metavar="PATH")
    tokenizer: str | None = arg(None, "tokenizer checkpoint (default: the one recorded in the policy, "
                                      "hash-checked)", metavar="PATH")
    host: str = arg("localhost", "openpi policy server host (mode openpi)")
    port: int = arg(8000, "openpi policy server port (mode openpi)")
    # closed loop
    replan_steps: int | None = arg(None, "steps of each chunk executed before the next is decoded "
                                         "(default: the whole chunk, the tokenizer's chunk size; openpi: 5)")
    expert_noise: float = arg(1.0, "scripted expert variation (mode expert)")
    action_noise: float = arg(0.0, "a control for approximate decoding: every policy mode executes its arm "
                                   "actions plus a smooth random perturbation, AR(1) over steps, standard "
                                   "deviation SIGMA in normalized action units, drawn from the trial's seed",
                              metavar="SIGMA")
    max_steps: int | None = arg(None, "steps per trial (default: the suite's standard limit)")
    reuse_env: bool = arg(False, "reset one simulation per task between trials instead of building one per "
                                 "trial from the trial's seed: faster, but trials are then not repeatable")
    video: bool = arg(False, "render cameras and write one video per trial (slow: ~0.1 s per camera per step)")
    video_dir: str = arg("videos", "folder of the videos")
    # run
    seed: int = arg(0, "scene seed of the trials (fixture placement, the modes' sampling)")
    threads: int = cli.threads_arg(1)
    device: str = cli.device_arg()
    json: str | None = cli.json_arg()
    plot: str | None = arg(None, "success (95% interval) against latency per mode, and success per task",
                           metavar="PNG")

    def __post_init__(self):
        self.device = str(cli.resolve_device(self.device))
        if isinstance(self.task_id, str):
            self.task_id = ca.parse_task_ids(self.task_id)
        if isinstance(self.mode, str):
            self.mode = parse_modes(self.mode, EXTRA_MODES + ("all",))
        if self.policy == "openpi":  # a served policy, not a checkpoint: its own row
            self.policy = None
            self.mode = ["openpi"] if self.mode == ["rsd"] else self.mode
            cli.require("openpi" in self.mode, "--policy openpi evaluates the mode 'openpi'")
        self.check_decoding()
        n = len(ca.HELD_OUT_INIT_STATES)
        cli.require(1 <= self.num_trials <= n,
                    f"--num_trials must be in 1..{n}: trial i starts from held-out init state i "
                    f"({ca.HELD_OUT_INIT_STATES.start}..{ca.HELD_OUT_INIT_STATES.stop - 1}); init states "
                    f"from {ca.HELD_OUT_INIT_STATES.stop} on are training states, got {self.num_trials}")
        cli.require(self.max_steps is None or self.max_steps >= 1, f"--max_steps must be >= 1, got {self.max_steps}")
        cli.require(self.replan_steps is None or self.replan_steps >= 1,
                    f"--replan_steps must be >= 1, got {self.replan_steps}")
        self.check_workers()
        cli.require(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        check_action_noise(self.action_noise)
        if "all" in self.mode:  # every engine mode (parallel, heads only with their models), where 'all' stands
            i = self.mode.index("all")
            every = [m for m in parse_modes("all") if (m != "parallel" or self.parallel_policy)
                     and (m not in HEADS_MODES or self.heads) and m not in self.mode]
            self.mode = self.mode[:i] + every + self.mode[i + 1:]

    @property
    def policy_modes(self) -> list[str]:
        return [m for m in self.mode if m not in EXTRA_MODES]


# ----------------------------------------------------------------------------- trials


def write_video(ep, path: str, fps: int = 20) -> None:
    import cv2

    frames = ep.obs.get("agentview_image")
    if frames is None or len(frames) == 0:
        raise ValueError("no camera frames recorded; --video needs cameras")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        # IMPORTANT: robosuite renders upside down; flip to the usual view, RGB -> BGR
        writer.write(np.ascontiguousarray(f[::-1, ::-1, ::-1]))
    writer.release()


def run_trial(env: ca.LiberoEnv, policy, mode: str, trial: int, args: EvalArgs, res: ModeResult) -> None:
    """Trial ``trial`` (from held-out init state ``trial``) of one task with one policy, added to
    ``res``."""
    seed = ca.episode_seed(args.seed, env.task.task_id, trial)
    n_chunks = len(getattr(policy, "stats", []))
    n_perturbed = len(getattr(policy, "perturbations", []))
    try:
        ep = ca.run_episode(env, policy, trial, seed, keep_images=args.video, max_steps=args.max_steps,
                            scene_seed=None if args.reuse_env else seed)
    except Exception as exc:  # counted and reported, never a success
        res.trials += 1
        res.errors += 1
        res.outcomes.append(0)
        msg = f"task {env.task.task_id} trial {trial} mode {mode}: {type(exc).__name__}: {exc}"
        res.error_messages.append(msg)
        log.warning("error in %s\n%s", msg, traceback.format_exc(limit=3))
        return
    res.trials += 1
    res.successes += int(ep.success)
    res.outcomes.append(int(ep.success))
    res.steps.append(len(ep))
    if args.video:
        outcome = "success" if ep.success else "failure"
        write_video(ep, os.path.join(args.video_dir, f"{env.task.suite}_task{env.task.task_id}_"
                                     f"trial{trial}_{mode.replace('+', '_')}_{outcome}.mp4"))
    res.chunks += getattr(policy, "stats", [])[n_chunks:]
    res.perturbations += getattr(policy, "perturbations", [])[n_perturbed:]


def make_policy(mode: str, engine, args: EvalArgs):
    if mode == "expert":
        return ca.make_policy(ca.PolicySpec("scripted", noise=args.expert_noise))
    if mode == "openpi":
        return ca.make_policy(ca.PolicySpec("openpi", host=args.host, port=args.port, replan_steps=args.replan_steps))
    replan = args.replan_steps or engine.tokenizer.config.chunk_size  # default: the whole chunk
    return EnginePolicy(engine, args.engine_config(mode), replan, args.seed, args.action_noise)


class Evaluator:
    """Per-process state of an evaluation: the engine (None for the expert alone)."""

    def __init__(self, args: EvalArgs):
        self.args = args
        self.engine = load_engine(args)

    def task(self, task_id: int, trials: range | None = None) -> dict:
        """Every mode on one task's trials (all of them, or ``trials``), in one env: {mode:
        ModeResult}, trial-major (trial 0 in every mode, then trial 1, ...) so a change of machine
        load weighs on all modes alike."""
        args = self.args
        env = ca.LiberoEnv(args.task_suite, task_id, cameras=args.video or "openpi" in args.mode)
        try:
            policies = {m: make_policy(m, self.engine, args) for m in args.mode}
            results = {m: ModeResult() for m in args.mode}
            for trial in trials if trials is not None else range(args.num_trials):
                for m in args.mode:
                    run_trial(env, policies[m], m, trial, args, results[m])
            return results
        finally:
            env.close()


def _evaluator(args: EvalArgs) -> Evaluator:
    return Evaluator(args)


def _evaluate_trials(evaluator: Evaluator, item: tuple[int, int, int]):
    """item (task, first trial, last trial + 1) -> (task, {mode: ModeResult})."""
    task_id, start, stop = item
    return task_id, evaluator.task(task_id, range(start, stop))


def work_items(args: EvalArgs, task_ids: list[int]) -> list[tuple[int, int, int]]:
    """(task, first trial, stop) per unit of work: a task's trials together on local processes
    (its env and modes built once), shards of RAY_SHARD_TRIALS trials on Ray. Every trial draws
    its scene from its own seed, so the outcomes are the same either way."""
    step = RAY_SHARD_TRIALS if args.backend == "ray" else args.num_trials
    return [(t, s, min(s + step, args.num_trials)) for t in task_ids for s in range(0, args.num_trials, step)]


def load_engine(args: EvalArgs):
    """The engine the policy modes need (None when only the expert runs), every mode's settings
    checked against it."""
    modes = args.policy_modes
    if not modes:
        return None
    if not args.policy:
        raise ValueError(f"--mode {','.join(modes)} needs --policy")
    speculative = any(base_mode(m) in SPECULATIVE_MODES for m in modes)
    parallel = any(base_mode(m) == "parallel" for m in modes)
    self_draft = any(base_mode(m) in HEADS_MODES for m in modes)
    engine = build_engine(args.policy, draft=args.draft if speculative else None,
                          parallel_policy=args.parallel_policy if parallel else None,
                          stop_model=args.stop_model, tokenizer=args.tokenizer, device=args.device,
                          heads=args.heads if self_draft else None)
    for m in modes:
        engine.check_config(args.engine_config(m), m)
    return engine


def check_run(args: EvalArgs, engine, task_ids: list[int]) -> None:
    """Everything that can be checked before the first trial."""
    if "expert" in args.mode:
        ca.check_policy_supports("scripted", args.task_suite)
    check_outputs({"--json": args.json, "--plot": args.plot},
                  {"--policy": args.policy, "--draft": args.draft, "--heads": args.heads,
                   "--parallel_policy": args.parallel_policy,
                   "--stop_model": args.stop_model, "--tokenizer": args.tokenizer})
    if engine is None:
        return
    chunk = engine.tokenizer.config.chunk_size
    if args.replan_steps is not None and args.replan_steps > chunk:
        raise ValueError(f"--replan_steps {args.replan_steps} exceeds the chunk size {chunk}")
    for t in task_ids:
        instruction = ca.get_task(args.task_suite, t).instruction
        if instruction not in engine.policy.config.instructions:
            raise ValueError(f"the policy was not trained on the instruction {instruction!r} "
                             f"({args.task_suite} task {t}); it knows: {list(engine.policy.config.instructions)}")


def evaluate(args: EvalArgs) -> dict:
    """Run every mode on every task's trials; the result ``results.py`` reads."""
    torch.set_num_threads(args.threads)
    task_ids = ca.resolve_task_ids(args.task_suite, args.task_id)
    engine = load_engine(args)
    check_run(args, engine, task_ids)
    totals = {m: ModeResult() for m in args.mode}
    per_task: dict = {}
    t0 = time.perf_counter()
    bar = cli.progress(total=len(task_ids) * len(args.mode) * args.num_trials, desc="eval", unit="trial")
    for t, rows in workers.map_ordered(_evaluator, (args,), _evaluate_trials, work_items(args, task_ids),
                                       args.workers, args.threads, backend=args.backend,
                                       ray_address=args.ray_address):
        per_task.setdefault(t, {m: ModeResult() for m in args.mode})  # shards come in trial order
        for m, res in rows.items():
            per_task[t][m].add(res)
            totals[m].add(res)
            bar.update(res.trials)
        bar.set_postfix(**{mm: f"{r.successes}/{r.trials}" for mm, r in totals.items()})
    bar.close()
    result = summarize(totals, per_task)
    result["config"] = {**cli.settings_dict(args), "modes": list(args.mode), "task_ids": task_ids,
                        "init_states": "held_out", "wall_seconds": time.perf_counter() - t0}
    if engine is not None and args.replan_steps is None:  # what the token policies ran with
        result["config"]["replan_steps"] = engine.tokenizer.config.chunk_size
    return result


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(EvalArgs, __doc__.splitlines()[0])


def main(args: EvalArgs) -> dict:
    cli.start(args, log)
    result = evaluate(args)
    report(result, args.json, args.plot)
    return result


if __name__ == "__main__":
    cli.run(main, build_parser())
