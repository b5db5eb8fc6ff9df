"""How good is adaptive depth's stop rule? Decode every layer, then ask each rule where it stops.

For each state, dense greedy decoding of every layer gives the **action gap** of every prefix:
the max abs difference (normalized action units) between the actions of the first n layers and
of all L, what stopping after n layers costs that chunk. A stop rule, run on the same layer-by-
layer signals, keeps some number of layers per state; its row reports the mean layers kept and
the gap it leaves (mean, 90th percentile, max, share above 0.1). Rules: the engine's
``expected_norm`` rule at several thresholds, every ``fixed`` depth, a ``learned`` stop model
(``train_stop.py``) and an ``oracle`` that stops at the first prefix within a tolerance of the
whole code (it knows the layers to come: no rule keeps fewer layers for that gap).

Used by ``bench_decoding.py --stop_study`` (held-out states) and ``train_stop.py`` (its
validation states).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rsd_engine_core import LearnedStop, RSDEngine


@torch.no_grad()
def layer_signals(engine: RSDEngine, obs: np.ndarray, task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Dense greedy decoding of one state, every layer (``RSDEngine.dense_trace``): the
    ``expected_norm`` rule's stop signal after each layer [L], the action gap of every prefix
    (gap[n - 1] for the first n layers, so gap[L - 1] = 0), and, with a stop model, its
    prediction after each layer [L], log(gap + gap_eps) as the engine compares it (else None)."""
    logits, codes, gap = engine.dense_trace(obs, task)
    L = len(logits)
    signal = engine.expected_refinements(logits, codes)
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


def study_rows(gaps: np.ndarray, signals: np.ndarray, learned: np.ndarray | None, gap_eps: float | None,
               expected_norm_thresholds, learned_thresholds, oracle_tolerances, min_layers: int,
               fixed: bool = True) -> list[dict]:
    """Every rule's row on the same states: gaps, signals [M, L] (``layer_signals``), ``learned``
    [M, L] the stop model's predicted log(gap + gap_eps) or None."""
    L = gaps.shape[1]
    rows = [stop_rule_row(gaps, "expected_norm", tau, stop_depths(signals, tau, min_layers))
            for tau in expected_norm_thresholds]
    if fixed:
        rows += [stop_rule_row(gaps, "fixed", n, np.full(len(gaps), n)) for n in range(1, L + 1)]
    if learned is not None:
        rows += [stop_rule_row(gaps, "learned", tol, stop_depths(learned, math.log(tol + gap_eps), min_layers))
                 for tol in learned_thresholds]
    rows += [stop_rule_row(gaps, "oracle", tol, stop_depths(gaps, tol, min_layers)) for tol in oracle_tolerances]
    return rows
