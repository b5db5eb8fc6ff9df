"""Benchmark every decoding mode on recorded observations, without the simulator (phase 3).

    python bench_decoding.py --policy policy.pt --draft draft.pt --data rollouts.hdf5 \\
        --mode dense,rsd,adaptive,rsd+adaptive --adaptive_threshold 0.1 --json decoding.json

The closed loop (``eval_libero.py``) measures success; its latencies and pass counts depend on
the states each mode's own trajectory reaches. This script decodes one chunk in every mode
from the same recorded states (the observation at the start of every chunk of every episode,
as the closed loop sees it when it executes whole chunks), in turn (mode order rotated from
state to state), batch 1 on one thread, so:

- the latency ratios are measured side by side on identical inputs, in a minute, and are
  repeatable where closed-loop ones are not;
- each mode's output is compared with dense greedy decoding of the same state: ``exact``
  acceptance must give the very same codes (``same_codes_as_dense`` = 1; adaptive modes stop
  early, so their codes differ by construction), and every mode reports how far its actions
  move from dense (max abs difference per chunk, normalized units).

``--stop_study`` asks how good adaptive depth's stop rule is, without timing anything: on the
same states it decodes every layer densely and measures how far the actions of each prefix are
from those of the whole code, then reports, for the engine's rule at several thresholds, for
every fixed depth and for an oracle that stops at the first prefix within a tolerance of the
whole code (it knows the layers to come, so no rule can do better at its depth), the mean
number of layers and the action gap they leave.

``--draft A.pt B.pt ...`` compares drafts: every speculative mode runs with each (rows
``MODE (A)``, ``MODE (B)``), in the same rotation on the same states.

``--pass_costs`` measures, instead of decoding, what one main pass costs against the new tokens
it carries and against batch rows, beside the FLOP-bound time of each pass (``pass_costs.py``):
of the policy given, or without ``--policy`` of a randomly initialised one of the default
architecture (its times only; the output names the model timed).

``--coverage`` asks, without timing anything, how wide a token tree must be: on the same states,
for every layer the draft proposes, how often the main policy's greedy codes of that layer (dense
decoding of the state) are among the draft's N most probable whole-layer candidates (the order in
which ``tree`` offers them; a chained draft given the dense codes below), how many leading layers
a tree with N candidates on every layer could accept at most, and the main policy's own mean top-1
probability per layer (how undecided the choice a proposal must foresee is).

``--oracle_draft`` replaces the draft by a perfect one (the main policy's own greedy codes,
proposed at no cost): ``rsd:K`` then shows how fast exact speculation with K proposed layers
can be on this CPU whatever the draft. ``--oracle_noise S`` blurs its logits (one-hot plus
Gaussian noise of standard deviation S), so that its first choice is sometimes wrong and the
right code is often among its next ones: how far ``tree``'s extra candidates make up for it.

``--heads PATH`` adds self-drafting heads (``train_draft.py --heads``) for the modes ``heads:J``,
``heads+adaptive`` and (with ``--draft``) ``rsd+heads``, ``rsd+heads+adaptive``; ``--oracle_heads`` replaces them by perfect ones (the main policy's own greedy
codes, proposed at no cost): every proposal is accepted, so ``heads:J`` shows how fast proposing at
every pass can be on this CPU, 1 + ceil((L - 1) / (J + 1)) main passes per chunk of L layers.

Use states the models never trained on: record the main policy's own rollouts from held-out
init states (``collect_actions.py --policy token --checkpoint P --init_states held_out
--num_episodes 20 --task_id all --output FILE``). The script reports which init states the
episodes started from.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

import cli
import pass_costs
import policy_models as pm
from cli import arg
from demos import HELD_OUT_INIT_STATES, load_episodes
from fileio import check_outputs
from policy_data import policy_states
from rsd_engine_core import (DecodingArgs, RSDEngine, base_mode, build_engine, chunk_summary, parse_modes,
                             top_candidates)
from stop_study import layer_signals, print_stop_rules, study_rows

log = logging.getLogger("bench_decoding")


def policy_mode_list(value: str) -> list[str]:
    import argparse

    try:
        return parse_modes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class BenchArgs(DecodingArgs):
    policy: str | None = arg(None, "main policy checkpoint (variant ar); optional with --pass_costs", metavar="PATH")
    draft: list[str] | None = arg(None, "draft checkpoint(s) (the speculative modes); with several, every "
                                        "speculative mode runs with each, as 'MODE (file stem)', on the same states",
                                  nargs="+", metavar="PATH")
    oracle_draft: bool = arg(False, "instead of --draft, a perfect draft: it proposes the main policy's own greedy "
                                    "codes of the state, at no cost (an upper bound of exact speculation's "
                                    "speed-up for any k; give the k as rsd:K)")
    oracle_noise: float = arg(0.0, "--oracle_draft: standard deviation of Gaussian noise added to its one-hot "
                                    "logits (an imperfect draft whose misses are near-misses)")
    heads: str | None = arg(None, "self-drafting heads checkpoint (train_draft.py --heads; the modes heads, "
                                  "heads+adaptive, rsd+heads, rsd+heads+adaptive)", metavar="PATH")
    oracle_heads: bool = arg(False, "instead of --heads, perfect self-drafting heads: they propose the main policy's "
                                    "own greedy codes of the state, at no cost (an upper bound of the heads modes' "
                                    "speed-up; give the layers proposed per pass as heads:J)")
    tokenizer: str | None = arg(None, "tokenizer checkpoint (default: the one recorded in the policy, "
                                      "hash-checked)", metavar="PATH")
    data: list[str] = arg(None, "demo / rollout files (HDF5) whose states are decoded (not read by --pass_costs)",
                          factory=list, nargs="+", metavar="PATH")
    mode: list[str] = arg(None, "comma list of MODE[@ACCEPTANCE][:K][/C] as in eval_libero.py (dense always runs: "
                                "it is the reference)",
                          factory=lambda: ["dense", "rsd", "adaptive", "rsd+adaptive"], type=policy_mode_list)
    stop_study: bool = arg(False, "instead of timing modes: adaptive depth's stop rule (at --stop_thresholds, "
                                  "with --min_layers) against every fixed depth and an oracle stop "
                                  "(--oracle_tolerances): mean layers and the action gap to the whole code")
    stop_thresholds: list[float] = arg(None, "comma list of --adaptive_threshold values for --stop_study",
                                       factory=lambda: [0.05, 0.07, 0.085, 0.1, 0.12], type=cli.float_list)
    oracle_tolerances: list[float] = arg(None, "comma list of action gaps (normalized units) for --stop_study's "
                                               "oracle (and its learned rule)",
                                         factory=lambda: [0.02, 0.05, 0.1, 0.15, 0.2], type=cli.float_list)
    pass_costs: bool = arg(False, "instead of decoding states: the cost of one main pass against the new tokens it "
                                  "carries and against batch rows, with each pass's FLOP-bound time (without "
                                  "--policy: a randomly initialised policy of the default architecture)")
    pass_repeats: int = arg(200, "--pass_costs: timed passes per row (median)")
    coverage: bool = arg(False, "instead of timing modes: how often the main policy's greedy codes of each proposed "
                                "layer are among the draft's N best whole-layer candidates (N in --coverage_sizes)")
    coverage_sizes: list[int] = arg(None, "comma list of candidate counts N for --coverage",
                                    factory=lambda: [1, 2, 4, 8, 16, 32, 64], type=cli.int_list)
    max_states: int = arg(2000, "decode at most this many states (a random subset)")
    warmup: int = arg(20, "untimed states first")
    seed: int = cli.seed_arg()
    threads: int = cli.threads_arg(1)
    device: str = cli.device_arg()
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.device = str(cli.resolve_device(self.device))
        if isinstance(self.mode, str):
            self.mode = parse_modes(self.mode)
        self.check_decoding()
        cli.require(self.max_states >= 1, f"--max_states must be >= 1, got {self.max_states}")
        cli.require(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        cli.require(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        cli.require(self.pass_repeats >= 1, f"--pass_repeats must be >= 1, got {self.pass_repeats}")
        cli.require(self.pass_costs + self.stop_study + self.coverage <= 1,
                    "give one of --pass_costs, --stop_study and --coverage")
        if self.coverage:
            cli.require(bool(self.draft) or self.oracle_draft,
                        "--coverage measures a draft: give --draft or --oracle_draft")
            cli.require(not self.draft or len(self.draft) == 1,
                        f"--coverage measures one draft, got {len(self.draft or [])}")
        if self.pass_costs:
            cli.require(self.device == "cpu", f"--pass_costs measures passes on the CPU, got --device {self.device}")
        else:
            cli.require(self.policy is not None, "--policy is required (except with --pass_costs)")
            cli.require(bool(self.data), "--data is required (except with --pass_costs)")
        cli.require("parallel" not in map(base_mode, self.mode),
                    "--mode parallel is not benchmarked here (use eval_libero.py --parallel_policy)")
        if self.stop_study:
            cli.require(not self.draft and not self.oracle_draft,
                        "--stop_study decodes every layer densely: give neither --draft nor --oracle_draft")
            cli.require(not self.oracle_stop, "--stop_study has the oracle's rows already (--oracle_tolerances); "
                                              "--oracle_stop is for timing the adaptive modes")
        cli.require(not (self.draft and self.oracle_draft), "give --draft or --oracle_draft, not both")
        cli.require(not (self.heads and self.oracle_heads), "give --heads or --oracle_heads, not both")
        cli.require(not (self.stop_study and (self.heads or self.oracle_heads)),
                    "--stop_study decodes every layer densely: give neither --heads nor --oracle_heads")
        cli.require(not (self.oracle_heads and self.draft and len(self.draft) > 1),
                    "--oracle_heads runs with one --draft at most")
        cli.require_positive("--oracle_noise", self.oracle_noise, allow_zero=True)
        cli.require(self.oracle_draft or not self.oracle_noise, "--oracle_noise blurs --oracle_draft: give both")
        if self.oracle_draft:
            cli.require(not any(self.engine_config(m).sampling for m in self.mode),
                        "--oracle_draft proposes the dense greedy codes: give modes with exact or relaxed "
                        "acceptance, not sample")

    @property
    def modes(self) -> list[str]:
        """dense first (the reference), then the other modes asked for."""
        return ["dense"] + [m for m in self.mode if m != "dense"]


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(BenchArgs, __doc__.splitlines()[0])


class OracleDraft:
    """A perfect draft for ``RSDEngine``: before each speculative decode, ``set_codes`` gives it
    the main policy's dense greedy codes of the state [1, T', L], which it proposes as one-hot
    logits, without a network (the engine reads ``config.num_layers``, ``config.source`` and
    calls ``fused().propose(features, task, k, pick)``). Exact acceptance then accepts every
    proposed layer, so the verify pass and the layers after the proposal are all that
    speculation costs. With ``noise`` > 0 the logits are the one-hot plus Gaussian noise of that
    standard deviation, drawn once per state (every mode sees the same draft), and it proposes
    their argmax."""

    def __init__(self, num_layers: int, vocab: int, noise: float = 0.0, seed: int = 0):
        self.config = SimpleNamespace(num_layers=num_layers, source="oracle")
        self.vocab, self.noise = vocab, noise
        self.gen = torch.Generator().manual_seed(seed)
        self.logits: torch.Tensor | None = None

    def set_codes(self, codes: torch.Tensor) -> None:
        """The state's dense greedy codes [1, T', L]."""
        logits = torch.nn.functional.one_hot(codes, self.vocab).float()  # [1, T', L, vocab]
        if self.noise:
            logits = logits + self.noise * torch.randn(logits.shape, generator=self.gen).to(logits.device)
        self.logits = logits

    def eval(self) -> "OracleDraft":
        return self

    def to(self, device) -> "OracleDraft":
        return self  # it holds no weights; its codes come from the engine's own device

    def fused(self) -> "OracleDraft":
        return self

    def __call__(self, features, task) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError("OracleDraft.set_codes must be given the state's dense codes first")
        return self.logits

    def propose(self, features, task, k: int, pick=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [1, T', k, vocab], their argmax [1, T', k]: without noise the dense codes); never
        sampled (``main`` refuses sample acceptance with the oracle)."""
        logits = self(features, task)[:, :, :k]
        return logits, logits.argmax(-1)


class OracleHeads:
    """Perfect self-drafting heads for ``RSDEngine`` (modes ``heads``): before each decode,
    ``set_codes`` gives them the main policy's dense greedy codes of the state [1, T', L], and
    from the block of layer l they propose those codes of layers l+1..l+n, without a network.
    Exact acceptance then accepts every proposal, so a chunk takes 1 + ceil((L - 1) / (J + 1))
    main passes: how fast the heads modes can be on this CPU whatever heads are trained."""

    def __init__(self, policy: pm.TokenPolicy, offsets: int | None = None):
        c = policy.config
        self.config = pm.HeadsConfig(d_model=c.d_model, latent_steps=c.latent_steps, num_layers=c.num_layers,
                                     codebook_sizes=c.codebook_sizes, offsets=offsets or max(c.num_layers - 2, 1))
        self.codes: torch.Tensor | None = None

    def set_codes(self, codes: torch.Tensor) -> None:
        """The state's dense greedy codes [1, T', L]."""
        self.codes = codes

    def eval(self) -> "OracleHeads":
        return self

    def to(self, device) -> "OracleHeads":
        return self  # no weights; its codes come from the engine's own device

    def propose(self, hidden, code, layer: int, n: int) -> torch.Tensor:
        """The dense codes of layers layer+1..layer+n [1, T', n]."""
        if self.codes is None:
            raise RuntimeError("OracleHeads.set_codes must be given the state's dense codes first")
        return self.codes[..., layer + 1: layer + 1 + n]


def main(args: BenchArgs) -> dict:
    cli.start(args, log)
    torch.set_num_threads(args.threads)
    check_outputs({"--json": args.json}, {"--policy": args.policy, "--draft": args.draft, "--heads": args.heads,
                                          "--data": args.data})
    if args.pass_costs:
        return measure_pass_costs(args)
    if args.stop_study:
        engine = build_engine(args.policy, stop_model=args.stop_model, tokenizer=args.tokenizer, device=args.device)
        episodes, obs, order, tasks = recorded_states(args, engine)
        return stop_study(args, engine, episodes, obs[order[args.warmup:]], tasks[args.warmup:])
    if args.coverage:
        engine = build_engine(args.policy, draft=None if args.oracle_draft else args.draft[0], tokenizer=args.tokenizer,
                              device=args.device)
        oracle = None
        if args.oracle_draft:
            pc = engine.policy.config
            oracle = OracleDraft(pc.num_layers, pc.vocab, args.oracle_noise, args.seed)
            engine = RSDEngine(engine.policy, engine.tokenizer, oracle, device=args.device)
        episodes, obs, order, tasks = recorded_states(args, engine)
        return coverage_study(args, engine, episodes, obs[order[args.warmup:]], tasks[args.warmup:], oracle)
    oracle = oracle_heads = None
    if args.oracle_draft or args.oracle_heads:
        base = build_engine(args.policy, draft=None if args.oracle_draft or not args.draft else args.draft[0],
                            stop_model=args.stop_model, tokenizer=args.tokenizer, device=args.device,
                            heads=None if args.oracle_heads else args.heads)
        pc = base.policy.config
        draft, heads = base.draft, base.heads
        if args.oracle_draft:
            draft = oracle = OracleDraft(pc.num_layers, pc.vocab, args.oracle_noise, args.seed)
        if args.oracle_heads:
            heads = oracle_heads = OracleHeads(base.policy)
        engine = RSDEngine(base.policy, base.tokenizer, draft, stop_model=base.stop_model, device=args.device,
                           heads=heads)
        runs = {m: (engine, args.engine_config(m)) for m in args.modes}
    else:
        runs = draft_runs(args)
    for name, (eng, cfg) in runs.items():
        eng.check_config(cfg, name)
    engine = runs["dense"][0]
    episodes, obs, order, tasks = recorded_states(args, engine)
    names = list(runs)
    gen = torch.Generator().manual_seed(args.seed)
    rows = {m: [] for m in names}
    init_ids = sorted({ep.init_state_id for ep in episodes})
    log.info("%d episodes (init states %s), %d chunk-start states, decoding %d (+%d warm-up) in %d modes",
             len(episodes), _ranges(init_ids), len(obs), len(order) - min(args.warmup, len(order)),
             min(args.warmup, len(order)), len(names))
    for n, (i, task) in enumerate(cli.progress(list(zip(order, tasks)), desc="states", unit="state")):
        shift = n % len(names)
        out = {}
        if oracle is not None or oracle_heads is not None:  # perfect proposals: dense greedy decoding's codes (untimed)
            codes = engine.act(obs[i], task, runs["dense"][1], gen)[2]
            for o in (oracle, oracle_heads):
                if o is not None:
                    o.set_codes(codes)
        for m in names[shift:] + names[:shift]:
            eng, cfg = runs[m]
            out[m] = eng.act(obs[i], task, cfg, gen)  # (actions, stats, codes)
        if n < args.warmup:
            continue
        dense_actions, _, dense_codes = out["dense"]
        norm_dense = engine.tokenizer.normalize(torch.as_tensor(dense_actions)[None])[0]
        for m, (actions, stats, codes) in out.items():
            gap = float((engine.tokenizer.normalize(torch.as_tensor(actions)[None])[0] - norm_dense).abs().max())
            rows[m].append((stats, torch.equal(codes, dense_codes), gap))
    result = summarize(rows)
    result["data"] = data_summary(args, episodes, len(rows["dense"]))
    result["config"] = cli.settings_dict(args) | {"modes": args.modes}
    if oracle is not None:
        result["draft"] = "oracle: the main policy's own greedy codes, proposed at no cost" + (
            f", one-hot logits plus Gaussian noise of standard deviation {args.oracle_noise}" if args.oracle_noise else "")
    if oracle_heads is not None:
        result["heads"] = ("oracle: the main policy's own greedy codes of the layers after each pass, "
                           "proposed at no cost")
    print_table(result)
    cli.save_json(args.json, result, log)
    return result


def data_summary(args: BenchArgs, episodes: list, states: int) -> dict:
    init_ids = sorted({ep.init_state_id for ep in episodes})
    return {"files": list(args.data), "episodes": len(episodes), "init_states": init_ids,
            "held_out_init_states_only": all(s in HELD_OUT_INIT_STATES for s in init_ids),
            "states_decoded": states}


def draft_runs(args: BenchArgs) -> dict[str, tuple[RSDEngine, object]]:
    """Row name -> (engine, EngineConfig) of every mode; with several --draft files, every
    speculative mode once per draft, named 'MODE (file stem)', the engines sharing the policy,
    tokenizer and stop model."""
    paths = args.draft or []
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) < len(stems):
        raise ValueError(f"--draft: give files with different names, got {paths}")
    first = build_engine(args.policy, draft=paths[0] if paths else None, stop_model=args.stop_model,
                         tokenizer=args.tokenizer, device=args.device, heads=args.heads)
    engines = {stems[0]: first} if paths else {}
    for path, stem in zip(paths[1:], stems[1:]):
        engines[stem] = RSDEngine(first.policy, first.tokenizer, pm.load_draft(path, args.policy)[0],
                                  stop_model=first.stop_model, device=args.device, heads=first.heads)
    runs = {}
    for m in args.modes:
        cfg = args.engine_config(m)
        if not cfg.speculative or len(engines) < 2:
            runs[m] = (first, cfg)
        else:
            runs.update({f"{m} ({stem})": (eng, cfg) for stem, eng in engines.items()})
    return runs


def recorded_states(args: BenchArgs, engine: RSDEngine) -> tuple[list, np.ndarray, np.ndarray, list[int]]:
    """The episodes of --data, their chunk-start observations [M, obs_dim], the order in which
    to decode them (a random subset of --max_states + --warmup, warm-up first) and each
    ordered state's task index."""
    episodes = load_episodes(args.data, only_success=False)
    obs, tasks = policy_states(engine.policy.config, engine.tokenizer.config.chunk_size, episodes, args.data)
    if len(obs) <= args.warmup:
        raise ValueError(f"--data holds {len(obs)} chunk-start states, none left to measure after --warmup "
                         f"{args.warmup}: lower --warmup or give more episodes")
    order = np.random.default_rng(args.seed).permutation(len(obs))[: args.max_states + args.warmup]
    return episodes, obs, order, [int(tasks[i]) for i in order]


# ---------------------------------------------------------------- what a main pass costs

def measure_pass_costs(args: BenchArgs) -> dict:
    """``--pass_costs``: the table of ``pass_costs.pass_cost_rows`` for --policy, or for a randomly
    initialised policy of the default architecture."""
    if args.policy:
        policy = pm.load_policy(args.policy)[0]
        model = f"the policy {args.policy}"
    else:
        policy = pass_costs.random_policy(**pass_costs.RANDOM_POLICY_SHAPE, seed=args.seed)
        model = "a randomly initialised policy of the default architecture (no checkpoint)"
    shape = pass_costs.describe(policy)
    model += " (" + ", ".join(f"{k} {v}" for k, v in shape.items()) + ")"
    rows, rate = pass_costs.pass_cost_rows(policy, repeats=args.pass_repeats, warmup=args.warmup)
    result = {"model": model, "policy": args.policy, "architecture": shape, "threads": args.threads,
              "repeats": args.pass_repeats, "matmul_gflops": rate / 1e9, "rows": rows,
              "config": cli.settings_dict(args)}
    pass_costs.print_pass_costs(result)
    cli.save_json(args.json, result, log)
    return result


# ---------------------------------------------------------------- the stop rule study

def stop_study(args: BenchArgs, engine: RSDEngine, episodes: list, obs: np.ndarray, tasks: list[int]) -> dict:
    L = engine.policy.config.num_layers
    signals, gaps, learned = zip(*(layer_signals(engine, o, t)
                                   for o, t in cli.progress(list(zip(obs, tasks)), desc="states", unit="state")))
    signals, gaps = np.stack(signals), np.stack(gaps)
    stop = engine.stop_model
    result = {"rules": study_rows(gaps, signals, np.stack(learned) if stop is not None else None,
                                  stop.config.gap_eps if stop is not None else None, args.stop_thresholds,
                                  args.oracle_tolerances, args.oracle_tolerances, args.min_layers)}
    result["data"] = data_summary(args, episodes, len(gaps))
    result["config"] = cli.settings_dict(args)
    print(f"\n{len(gaps)} states; gap: max abs difference between the actions of the kept layers and of "
          f"all {L} (normalized units); the rules but fixed keep at least {args.min_layers} layers"
          + (f"; learned: {args.stop_model}, stopping at a predicted gap <= the parameter" if args.stop_model else ""))
    print_stop_rules(result["rules"])
    cli.save_json(args.json, result, log)
    return result


@torch.no_grad()
def layer_coverage(engine: RSDEngine, obs: np.ndarray, task: int, n: int,
                   oracle: OracleDraft | None = None) -> tuple[list[int | None], np.ndarray]:
    """One state: for each layer the draft proposes, the rank of the main policy's greedy codes of
    the layer among the draft's n most probable whole-layer candidates (``top_candidates``; None
    when not among them), and the main policy's top-1 probability per layer [L] (mean over the
    T' positions). A chained draft is given the dense codes of the layers below."""
    logits, codes, _ = engine.dense_trace(obs, task)
    top1 = torch.softmax(logits.float(), -1).amax(-1).mean(dim=(1, 2)).cpu().numpy()
    if oracle is not None:
        oracle.set_codes(codes)
    k = engine.draft.config.num_layers
    o, t = engine._inputs(obs, task)
    ctx = engine.policy.embed_obs(o, t)
    if getattr(engine.draft.config, "chained", False):
        draft, per_layer = engine.draft_fn, []
        z = draft._trunk(*engine._draft_inputs(o, t, ctx))
        for j in range(k):
            per_layer.append(top_candidates(draft._step(z, j)[0], n))
            if j + 1 < k:
                z = draft._add_codes(z, j, codes[..., j])
    else:
        d_logits = engine.draft_proposal(o, t, ctx, k)[0][0]  # [T', k, vocab]
        per_layer = [top_candidates(d_logits[:, j], n) for j in range(k)]
    ranks = []
    for j, candidates in enumerate(per_layer):
        target = tuple(codes[0, :, j].tolist())
        ranks.append(next((r for r, (_, c) in enumerate(candidates) if c == target), None))
    return ranks, top1


def coverage_study(args: BenchArgs, engine: RSDEngine, episodes: list, obs: np.ndarray, tasks: list[int],
                   oracle: OracleDraft | None = None) -> dict:
    sizes = sorted(set(args.coverage_sizes))
    ranks, top1 = zip(*(layer_coverage(engine, o, t, max(sizes), oracle)
                        for o, t in cli.progress(list(zip(obs, tasks)), desc="states", unit="state")))
    ranks = np.array([[math.inf if r is None else r for r in row] for row in ranks])  # [states, k]
    covered = ranks[:, :, None] < np.array(sizes)  # [states, k, sizes]
    leading = np.cumprod(covered, axis=1).sum(axis=1)  # [states, sizes]: leading layers all covered
    result = {"sizes": sizes,
              "covered": {str(j + 1): dict(zip(map(str, sizes), covered[:, j].mean(0).tolist()))
                          for j in range(ranks.shape[1])},
              "leading_layers_covered_mean": dict(zip(map(str, sizes), leading.mean(0).tolist())),
              "main_top1_probability_mean": np.stack(top1).mean(0).tolist(),
              "draft": "oracle" + (f" blurred by noise {args.oracle_noise}" if args.oracle_noise else "")
              if oracle is not None else args.draft[0]}
    result["data"] = data_summary(args, episodes, len(ranks))
    result["config"] = cli.settings_dict(args)
    print(f"\n{len(ranks)} states; share of states whose main-policy greedy codes of a layer are among the draft's N "
          "most probable candidates for it:")
    print("layer | " + " | ".join(f"N={n:<4d}" for n in sizes))
    for j in range(ranks.shape[1]):
        print(f"{j + 1:5d} | " + " | ".join(f"{v:6.3f}" for v in covered[:, j].mean(0)))
    print("leading layers covered (what a tree with N candidates on every layer could accept at most): "
          + ", ".join(f"N={n}: {v:.2f}" for n, v in zip(sizes, leading.mean(0))))
    print("main policy's mean top-1 probability per layer: "
          + ", ".join(f"{p:.2f}" for p in result["main_top1_probability_mean"]))
    cli.save_json(args.json, result, log)
    return result


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids else "-"


def summarize(rows: dict) -> dict:
    modes = {}
    for m, r in rows.items():
        stats = [s for s, _, _ in r]
        gaps = np.array([g for _, _, g in r])
        modes[m] = {
            "states": len(r),
            **chunk_summary(stats),
            "same_codes_as_dense": float(np.mean([same for _, same, _ in r])),
            "action_gap_vs_dense_mean": float(gaps.mean()),
            "action_gap_vs_dense_max": float(gaps.max()),
        }
    dense = modes["dense"]["latency_ms_median"]
    for s in modes.values():
        s["speedup_vs_dense"] = dense / s["latency_ms_median"]
    return {"modes": modes}


def print_table(result: dict) -> None:
    modes = result["modes"]
    for what in ("draft", "heads"):
        if what in result:
            print(f"\n{what}: {result[what]}")
    w = max(13, *(len(m) for m in modes))
    print(f"\n{'mode':>{w}} | {'latency ms':>10} | {'speedup':>7} | {'main passes':>11} | {'layers':>6} | "
          f"{'accepted':>8} | {'acceptance':>10} | {'same as dense':>13} | {'gap mean':>8} | {'gap max':>7} | "
          f"mean ms: main / draft / decode / other")
    for m, s in modes.items():
        acc = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.3f}"
        print(f"{m:>{w}} | {s['latency_ms_median']:10.2f} | {s['speedup_vs_dense']:6.2f}x | "
              f"{s['main_passes_per_chunk']:11.2f} | {s['layers_per_chunk']:6.2f} | "
              f"{s['accepted_layers_per_chunk']:8.2f} | {acc:>10} | {s['same_codes_as_dense']:13.3f} | "
              f"{s['action_gap_vs_dense_mean']:8.4f} | {s['action_gap_vs_dense_max']:7.4f} | "
              + " / ".join(f"{s['time_split_ms_mean'][k]:.2f}" for k in ("main", "draft", "tokenizer_decode", "other")))
    for m, s in modes.items():
        if s["fallbacks_per_chunk"]:
            print(f"{m}: {s['fallbacks_per_chunk']:.1%} of chunks met a choice within --tie_margin of a tie and were "
                  "decoded again densely")


if __name__ == "__main__":
    cli.run(main, build_parser())
