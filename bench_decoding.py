"""Phase 3 without the simulator: every decoding mode on recorded observations.

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

``--oracle_draft`` replaces the draft by a perfect one (the main policy's own greedy codes,
proposed at no cost): ``rsd:K`` then shows how fast exact speculation with K proposed layers
can be on this CPU whatever the draft.

Use states the models never trained on: record the main policy's own rollouts from held-out
init states (``eval_libero.py --mode dense --record FILE``, init states 0-19). The script
reports which init states the episodes started from.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import collect_actions as ca
import policy_models as pm
from eval_libero import ORACLE_STOP_HELP, base_mode, engine_config, load_engine, parse_modes
from policy_data import action_history, obs_vector
from rsd_engine_core import ACCEPTANCE, LearnedStop, RSDEngine, chunk_summary

log = logging.getLogger("bench_decoding")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decoding modes on recorded observations (phase 3, offline).")
    p.add_argument("--policy", required=True, help="main policy checkpoint (variant ar)")
    p.add_argument("--draft", nargs="+", default=None, metavar="PATH",
                   help="draft checkpoint(s) (modes rsd, rsd+adaptive); with several, every "
                        "speculative mode runs with each, as 'MODE (file stem)', on the same states")
    p.add_argument("--oracle_draft", action="store_true",
                   help="instead of --draft, a perfect draft: it proposes the main policy's own greedy "
                        "codes of the state, at no cost (an upper bound of exact speculation's speed-up "
                        "for any k; give the k as rsd:K)")
    p.add_argument("--tokenizer", help="default: the tokenizer recorded in the policy (hash-checked)")
    p.add_argument("--data", nargs="+", required=True, help="demo / rollout files (HDF5) whose states are decoded")
    p.add_argument("--mode", type=parse_modes, default=["dense", "rsd", "adaptive", "rsd+adaptive"],
                   help="comma list of MODE[@ACCEPTANCE][:K] as in eval_libero.py (dense is always run: "
                        "it is the reference)")
    p.add_argument("--acceptance", default="exact", choices=ACCEPTANCE)
    p.add_argument("--k", type=int, default=None, help="layers the draft proposes (default: all it predicts)")
    p.add_argument("--stop_model", default=None,
                   help="a learned stop model (train_stop.py): the adaptive modes use it (--adaptive_threshold "
                        "is then a predicted action gap); --stop_study adds its rule at --oracle_tolerances")
    p.add_argument("--oracle_stop", action="store_true", help=ORACLE_STOP_HELP)
    p.add_argument("--adaptive_threshold", type=float, default=0.05)
    p.add_argument("--min_layers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.05, help="relaxed acceptance, normalized units")
    p.add_argument("--stop_study", action="store_true",
                   help="instead of timing modes: adaptive depth's stop rule (at --stop_thresholds, with "
                        "--min_layers) against every fixed depth and an oracle stop (--oracle_tolerances): "
                        "mean layers and the action gap to the whole code (no draft needed)")
    p.add_argument("--stop_thresholds", type=float_list, default=[0.05, 0.07, 0.085, 0.1, 0.12],
                   help="comma list of --adaptive_threshold values for --stop_study")
    p.add_argument("--oracle_tolerances", type=float_list, default=[0.02, 0.05, 0.1, 0.15, 0.2],
                   help="comma list of action gaps (normalized units) for --stop_study's oracle")
    p.add_argument("--max_states", type=int, default=2000, help="decode at most this many states (a random subset)")
    p.add_argument("--warmup", type=int, default=20, help="untimed states first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at batch 1)")
    p.add_argument("--json", default=None)
    return p


def float_list(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {value!r}") from None
    if not out or any(v < 0 or not np.isfinite(v) for v in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers >= 0, got {value!r}")
    return out


class OracleDraft:
    """A perfect draft for ``RSDEngine``: it proposes ``codes`` [1, T', L], set to the main
    policy's dense greedy codes of the state before each speculative decode, as one-hot
    logits, without a network (the engine reads ``config.num_layers``, ``config.source`` and
    calls ``fused().propose(features, task, k, pick)``). Exact acceptance then accepts every
    proposed layer, so the verify pass and the layers after the proposal are all that
    speculation costs."""

    def __init__(self, num_layers: int, vocab: int):
        self.config = SimpleNamespace(num_layers=num_layers, source="oracle")
        self.vocab = vocab
        self.codes: torch.Tensor | None = None

    def eval(self) -> "OracleDraft":
        return self

    def fused(self) -> "OracleDraft":
        return self

    def __call__(self, features, task) -> torch.Tensor:
        if self.codes is None:
            raise RuntimeError("OracleDraft.codes must be set to the state's dense codes first")
        return torch.nn.functional.one_hot(self.codes, self.vocab).float()  # [1, T', L, vocab]

    def propose(self, features, task, k: int, pick=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(one-hot logits [1, T', k, vocab], the dense codes [1, T', k]); never sampled (``main``
        refuses sample acceptance with the oracle)."""
        return self(features, task)[:, :, :k], self.codes[..., :k]


def chunk_start_states(episodes: list, keys, history: int, chunk_size: int) -> tuple[np.ndarray, list[str]]:
    """The observation vector (with the executed-action history) at steps 0, T, 2T, ... of
    every episode: [M, obs_dim], and each state's instruction."""
    obs, instructions = [], []
    for ep in episodes:
        x = obs_vector(ep.obs, keys)
        if history:
            x = np.concatenate([x, action_history(ep.actions, history)], 1)
        steps = np.arange(0, len(ep), chunk_size)
        obs.append(x[steps])
        instructions += [ep.instruction] * len(steps)
    return np.concatenate(obs).astype(np.float32), instructions


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.max_states < 1 or args.warmup < 0:
        raise ValueError(f"--max_states must be >= 1 and --warmup >= 0, got {args.max_states}, {args.warmup}")
    if args.mode in (["all"], ["expert"]) or "expert" in args.mode:
        raise ValueError("--mode: give policy modes (MODE[@ACCEPTANCE][:K]); 'all' and 'expert' are "
                         "closed-loop choices of eval_libero.py")
    if args.stop_study:
        if args.draft or args.oracle_draft:
            raise ValueError("--stop_study decodes every layer densely: give neither --draft nor --oracle_draft")
        if args.oracle_stop:
            raise ValueError("--stop_study has the oracle's rows already (--oracle_tolerances); "
                             "--oracle_stop is for timing the adaptive modes")
        engine = load_engine(args, ["dense"])
        episodes, obs, order, tasks = recorded_states(args, engine)
        return stop_study(args, engine, episodes, obs[order[args.warmup:]], tasks[args.warmup:])
    args.modes = ["dense"] + [m for m in args.mode if m != "dense"]
    if "parallel" in map(base_mode, args.modes):
        raise ValueError("--mode parallel is not benchmarked here (use eval_libero.py --parallel_policy)")
    oracle = None
    if args.oracle_draft:
        if args.draft:
            raise ValueError("give --draft or --oracle_draft, not both")
        if any(engine_config(m, args).sampling for m in args.modes):
            raise ValueError("--oracle_draft proposes the dense greedy codes: give modes with exact or "
                             "relaxed acceptance, not sample")
        base = load_engine(args, ["dense"])
        pc = base.policy.config
        oracle = OracleDraft(pc.num_layers, pc.vocab)
        engine = RSDEngine(base.policy, base.tokenizer, oracle, stop_model=base.stop_model)
    if oracle is not None:
        runs = {m: (engine, engine_config(m, args)) for m in args.modes}
    else:
        runs = draft_runs(args)
    engine = runs["dense"][0]
    episodes, obs, order, tasks = recorded_states(args, engine)
    names = list(runs)
    gen = torch.Generator().manual_seed(args.seed)
    rows = {m: [] for m in names}
    init_ids = sorted({ep.init_state_id for ep in episodes})
    log.info("%d episodes (init states %s), %d chunk-start states, decoding %d (+%d warm-up) in %d modes",
             len(episodes), _ranges(init_ids), len(obs), len(order) - min(args.warmup, len(order)),
             min(args.warmup, len(order)), len(names))
    for n, (i, task) in enumerate(tqdm(list(zip(order, tasks)), desc="states", unit="state")):
        shift = n % len(names)
        out = {}
        if oracle is not None:  # the perfect draft proposes dense greedy decoding's codes (untimed)
            oracle.codes = engine.act(obs[i], task, runs["dense"][1], gen)[2]
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
    result["data"] = {"files": list(args.data), "episodes": len(episodes), "init_states": init_ids,
                      "held_out_init_states_only": all(s in ca.HELD_OUT_INIT_STATES for s in init_ids),
                      "states_decoded": len(rows["dense"])}
    result["config"] = {k: v for k, v in vars(args).items() if k != "modes"} | {"modes": args.modes}
    if oracle is not None:
        result["draft"] = "oracle: the main policy's own greedy codes, proposed at no cost"
    print_table(result)
    if args.json:
        ca.write_json(args.json, result)
        log.info("wrote %s", args.json)
    return result


def draft_runs(args) -> dict[str, tuple[RSDEngine, object]]:
    """Row name -> (engine, EngineConfig) of every mode; with several --draft files, every
    speculative mode once per draft, named 'MODE (file stem)', the engines sharing the policy,
    tokenizer and stop model."""
    paths = args.draft or []
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) < len(stems):
        raise ValueError(f"--draft: give files with different names, got {paths}")
    first = load_engine(SimpleNamespace(**{**vars(args), "draft": paths[0] if paths else None}), args.modes)
    engines = {stems[0]: first} if paths else {}
    for path, stem in zip(paths[1:], stems[1:]):
        engines[stem] = RSDEngine(first.policy, first.tokenizer, pm.load_draft(path, args.policy)[0],
                                  stop_model=first.stop_model)
    runs = {}
    for m in args.modes:
        cfg = engine_config(m, args)
        if not cfg.speculative or len(engines) < 2:
            runs[m] = (first, cfg)
        else:
            runs.update({f"{m} ({stem})": (eng, cfg) for stem, eng in engines.items()})
    return runs


def recorded_states(args, engine) -> tuple[list, np.ndarray, np.ndarray, list[int]]:
    """The episodes of --data, their chunk-start observations [M, obs_dim], the order in which
    to decode them (a random subset of --max_states + --warmup, warm-up first) and each
    ordered state's task index."""
    episodes = ca.load_episodes(args.data, only_success=False)
    obs, tasks = policy_states(engine, episodes, args.data)
    order = np.random.default_rng(args.seed).permutation(len(obs))[: args.max_states + args.warmup]
    return episodes, obs, order, [int(tasks[i]) for i in order]


def policy_states(engine: RSDEngine, episodes: list, source) -> tuple[np.ndarray, np.ndarray]:
    """The chunk-start observations of ``episodes`` as the policy reads them [M, obs_dim], and
    each one's task index [M]; episodes of an instruction the policy was not trained on, or
    observations of another size, are an error naming ``source``."""
    pc = engine.policy.config
    obs, instructions = chunk_start_states(episodes, pc.obs_keys, pc.action_history,
                                           engine.tokenizer.config.chunk_size)
    unknown = sorted(set(instructions) - set(pc.instructions))
    if unknown:
        raise ValueError(f"{source}: the policy was not trained on the instruction(s) {unknown}")
    if obs.shape[1] != pc.obs_dim:
        raise ValueError(f"{source}: observation vectors have {obs.shape[1]} values, the policy expects {pc.obs_dim}")
    return obs, np.array([pc.instructions.index(i) for i in instructions])


# ---------------------------------------------------------------- the stop rule study

@torch.no_grad()
def layer_signals(engine: RSDEngine, obs: np.ndarray, task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Dense greedy decoding of one state, every layer (``RSDEngine.dense_trace``): the
    ``expected_norm`` rule's stop signal after each layer [L], the action gap of every prefix
    (gap[n - 1] for the first n layers, so gap[L - 1] = 0), and, with a stop model, its
    prediction after each layer [L], log(gap + gap_eps) as the engine compares it (else None)."""
    logits, codes, gap = engine.dense_trace(obs, task)
    L = len(logits)
    signal = np.array([engine.expected_refinement(logits[l], l) for l in range(L)])
    learned = None
    if engine.stop_model is not None:
        stop = LearnedStop(engine)
        learned = np.array([stop.predicted_log_gap(l, codes[..., l]) for l in range(L)])
    return signal, gap, learned


def stop_depths(values: np.ndarray, limit: float, min_layers: int) -> np.ndarray:
    """values [N, L], one per layer: the layers kept when decoding stops after the first layer
    l (1-based, l >= min_layers) whose value is <= limit, or all L. With the stop signal this is
    adaptive depth's rule (``RSDEngine._stop``); with the prefix gaps, the oracle's."""
    N, L = values.shape
    ok = values <= limit
    ok[:, : max(min_layers, 1) - 1] = False
    return np.where(ok.any(1), ok.argmax(1) + 1, L)


def stop_study(args, engine: RSDEngine, episodes: list, obs: np.ndarray, tasks: list[int]) -> dict:
    L = engine.policy.config.num_layers
    signals, gaps, learned = zip(*(layer_signals(engine, o, t)
                                   for o, t in tqdm(list(zip(obs, tasks)), desc="states", unit="state")))
    signals, gaps = np.stack(signals), np.stack(gaps)

    def row(rule: str, parameter, depth: np.ndarray) -> dict:
        return stop_rule_row(gaps, rule, parameter, depth)

    result = {"rules": (
        [row("expected_norm", tau, stop_depths(signals, tau, args.min_layers)) for tau in args.stop_thresholds]
        + [row("fixed", n, np.full(len(gaps), n)) for n in range(1, L + 1)]
        + ([row("learned", tol, stop_depths(np.stack(learned), math.log(tol + engine.stop_model.config.gap_eps),
                                            args.min_layers))
            for tol in args.oracle_tolerances] if engine.stop_model is not None else [])
        + [row("oracle", tol, stop_depths(gaps, tol, args.min_layers)) for tol in args.oracle_tolerances])}
    init_ids = sorted({ep.init_state_id for ep in episodes})
    result["data"] = {"files": list(args.data), "episodes": len(episodes), "init_states": init_ids,
                      "held_out_init_states_only": all(s in ca.HELD_OUT_INIT_STATES for s in init_ids),
                      "states_decoded": len(gaps)}
    result["config"] = vars(args)
    print(f"\n{len(gaps)} states; gap: max abs difference between the actions of the kept layers and of "
          f"all {L} (normalized units); the rules but fixed keep at least {args.min_layers} layers"
          + (f"; learned: {args.stop_model}, stopping at a predicted gap <= the parameter" if args.stop_model else ""))
    print_stop_rules(result["rules"])
    if args.json:
        ca.write_json(args.json, result)
        log.info("wrote %s", args.json)
    return result


def stop_rule_row(gaps: np.ndarray, rule: str, parameter, depth: np.ndarray) -> dict:
    """One rule's line of a stop study: gaps [M, L] (gap of the first n layers at n - 1),
    depth [M] the layers the rule keeps per state -> mean layers and the gap they leave."""
    gap = gaps[np.arange(len(gaps)), depth - 1]
    return {"rule": rule, "parameter": parameter, "layers_mean": float(depth.mean()),
            "gap_mean": float(gap.mean()), "gap_p90": float(np.percentile(gap, 90)),
            "gap_max": float(gap.max()), "gap_above_0.1": float(np.mean(gap > 0.1))}


def print_stop_rules(rules: list[dict]) -> None:
    print(f"{'rule':>13} | {'parameter':>9} | {'layers':>6} | {'gap mean':>8} | {'gap p90':>7} | {'gap max':>7} | gap > 0.1")
    for r in rules:
        print(f"{r['rule']:>13} | {r['parameter']:>9g} | {r['layers_mean']:6.2f} | {r['gap_mean']:8.4f} | "
              f"{r['gap_p90']:7.4f} | {r['gap_max']:7.4f} | {r['gap_above_0.1']:9.3f}")


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
    if "draft" in result:
        print(f"\ndraft: {result['draft']}")
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


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (ValueError, KeyError) as exc:  # DemoFileError is a ValueError; KeyError: missing obs keys
        sys.exit(f"bench_decoding.py: error: {exc}")
