"""Closed-loop results: what a run of ``eval_libero.py`` saves, and everything read from it.

A result JSON holds, per decoding mode, the successes over all trials and each trial's outcome
(per task, in trial order), the latency and pass statistics of its chunks, and the settings it
ran with (``config``). Because every mode runs the same trials (init states and scene seeds),
modes are compared trial by trial: each success rate gets a 95% Wilson interval and each mode
a paired comparison with dense (trials only it solved, only dense solved, and the exact
McNemar test on those), sharper than comparing two rates. Two saved runs of the same trials
are compared the same way (``compare_runs``), and runs of the same trials over other scene
seeds are pooled (``pool_runs``). ``report_libero.py`` is the command for all of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from fileio import save_figure
from rsd_engine_core import chunk_summary


@dataclass
class ModeResult:
    trials: int = 0
    successes: int = 0
    errors: int = 0
    error_messages: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    chunks: list = field(default_factory=list)   # ChunkStats of every chunk
    outcomes: list = field(default_factory=list)  # per trial in trial order: 1 success, 0 not (errors: 0)
    perturbations: list = field(default_factory=list)  # with --action_noise: per chunk (EnginePolicy)

    def add(self, other: "ModeResult") -> None:
        self.trials += other.trials
        self.successes += other.successes
        self.errors += other.errors
        self.error_messages += other.error_messages
        self.steps += other.steps
        self.chunks += other.chunks
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
        if self.error_messages:
            out["error_messages"] = self.error_messages[:10]
        return out


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
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def read_json(path: str, flag: str):
    """The JSON in ``path``, given on the command line by ``flag``; a missing or broken file is an
    error that names both."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: not valid JSON ({exc})") from None


def load_result(path: str, flag: str = "--from_json") -> dict:
    """A result JSON written by ``eval_libero.py``, checked enough to report."""
    result = read_json(path, flag)
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
                raise ValueError(f"--modes: {name} has no mode {mode!r} "
                                 f"(it has {', '.join(result['modes'])})")
        pairs = [tuple(modes)]
    else:
        pairs = [(m, m) for m in first["modes"] if m in second["modes"]]
    if not pairs:
        raise ValueError(f"--compare: {names[0]} ({', '.join(first['modes'])}) and {names[1]} "
                         f"({', '.join(second['modes'])}) have no mode in common (--modes pairs two "
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
# a setting missing from a result saved before its flag existed: the value such runs had
SETTING_DEFAULTS = {"stop_model": None, "oracle_stop": False, "action_noise": 0.0, "expert_noise": 1.0,
                    "parallel_policy": None, "tokenizer": None, "k": None, "max_steps": None}


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
    for key in [k for k in TRIAL_KEYS if k != "seed"] + list(SETTING_KEYS):
        values = [c.get(key, SETTING_DEFAULTS.get(key)) for c in cfgs]
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
                row["success_rate"] = row["successes"] / row["trials"]
    result = {"runs": list(names), "seeds": [c["seed"] for c in cfgs], "modes": modes, "per_task": per_task,
              "config": {k: cfgs[0].get(k, SETTING_DEFAULTS.get(k))  # the same in every run
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


def report(result: dict, json_path: str | None = None, plot_path: str | None = None) -> None:
    """The table on stdout; the result as JSON and its plot where asked."""
    import logging

    from cli import save_json

    log = logging.getLogger("results")
    print_table(result)
    save_json(json_path, result, log)
    if plot_path:
        plot_results(result, plot_path)
        log.info("wrote %s", plot_path)


# ------------------------------------------------------------------ the four-suite table

# LIBERO's four standard suites, in the order papers report them, and their task counts
SUITE_COLUMNS = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# Published success rates (%) on the four suites, of policies reading camera images (not the
# low-dimensional state the policies here read): printed below the table for scale, not compared.
PUBLISHED_LIBERO = (
    ("Diffusion Policy, from scratch", "Chi et al. 2023; reported by Kim et al. 2024", (78.3, 92.5, 68.3, 50.5)),
    ("OpenVLA", "Kim et al. 2024", (84.7, 88.4, 79.2, 53.7)),
    ("pi0-FAST", "Pertsch et al. 2025; reported by Kim et al. 2025", (96.4, 96.8, 88.6, 60.2)),
    ("OpenVLA-OFT", "Kim et al. 2025", (97.6, 98.4, 97.9, 94.5)),
    ("pi0.5", "Physical Intelligence 2025, openpi", (98.8, 98.2, 98.0, 92.4)),
)


def load_expert_result(path: str, flag: str = "--expert") -> dict:
    """A JSON written by ``collect_actions.py --json`` for the scripted expert, checked enough to
    set beside the policies in the four-suite table."""
    result = read_json(path, flag)
    if not isinstance(result, dict) or not {"suite", "policy", "successes", "episodes", "per_task"} <= set(result):
        raise ValueError(f"{flag} {path}: not a collect_actions.py --json result (needs suite, policy, successes, "
                         "episodes and per_task)")
    if result["policy"] != "scripted":
        raise ValueError(f"{flag} {path}: collected by the {result['policy']!r} policy, not the scripted expert")
    return result


def expert_cells(results: list[dict], names: list[str]) -> dict:
    """The scripted expert's row of the four-suite table: per suite its success over the
    collection's episodes, the tasks it covered and the collection's wall time."""
    cells: dict[str, dict] = {}
    runs: dict[str, str] = {}
    for name, r in zip(names, results):
        suite = r["suite"]
        if suite in runs:
            raise ValueError(f"--expert: {runs[suite]} and {name} are both {suite}; give one collection per suite")
        runs[suite] = name
        tasks = len(r["per_task"])
        cells[suite] = {"successes": r["successes"], "trials": r["episodes"],
                        "success_rate": r["successes"] / r["episodes"] if r["episodes"] else 0.0,
                        "tasks": tasks, "all_tasks": tasks == SUITE_TASKS.get(suite),
                        "init_states": r.get("settings", {}).get("init_states"),
                        "min_task_success_rate": min(t["success_rate"] for t in r["per_task"].values()),
                        "wall_seconds": r.get("wall_seconds"), "speedup_vs_dense": None,
                        "main_passes_per_chunk": None, "vs_dense": None}
    four = [cells[s]["success_rate"] for s in SUITE_COLUMNS if s in cells]
    cells["average"] = float(np.mean(four)) if len(four) == len(SUITE_COLUMNS) else None
    return {"cells": cells, "runs": runs}


def suite_table(results: list[dict], names: list[str], experts: list[dict] | None = None,
                expert_names: list[str] | None = None) -> dict:
    """Closed-loop results of different suites side by side (one result per suite, a single run
    or a pool): per mode and suite the success, the speed-up against dense and the main passes
    per chunk, and per mode the average success over the four standard suites when it ran in
    all four. Columns in the standard order (libero_spatial, libero_object, libero_goal,
    libero_10), then any other suite."""
    runs: dict[str, str] = {}
    for name, r in zip(names, results):
        suite = r.get("config", {}).get("task_suite")
        if suite is None:
            raise ValueError(f"--suites: {name} records no task_suite (a result saved by an older version)")
        if suite in runs:
            raise ValueError(f"--suites: {runs[suite]} and {name} are both {suite}; give one result per suite "
                             "(report_libero.py --pool pools runs of one suite first)")
        runs[suite] = name
    order = [s for s in SUITE_COLUMNS if s in runs] + [s for s in runs if s not in SUITE_COLUMNS]
    by_suite = {r["config"]["task_suite"]: r for r in results}
    modes: dict[str, dict] = {}
    for suite in order:
        r = by_suite[suite]
        tasks = len(r["config"].get("task_ids") or [])
        for m, s in r["modes"].items():
            speedups = [x for x in s.get("speedup_vs_dense_per_run", [s.get("speedup_vs_dense")]) if x is not None]
            modes.setdefault(m, {})[suite] = {
                "successes": s["successes"], "trials": s["trials"], "success_rate": s["success_rate"],
                "tasks": tasks, "all_tasks": tasks == SUITE_TASKS.get(suite),
                "speedup_vs_dense": speedups or None,
                "main_passes_per_chunk": s.get("main_passes_per_chunk"),
                "vs_dense": s.get("vs_dense"), "wall_seconds": r["config"].get("wall_seconds")}
    for cells in modes.values():
        four = [cells[s]["success_rate"] for s in SUITE_COLUMNS if s in cells]
        cells["average"] = float(np.mean(four)) if len(four) == len(SUITE_COLUMNS) else None
    published = [{"name": n, "source": src, "success_pct": dict(zip(SUITE_COLUMNS, pct)),
                  "average": round(float(np.mean(pct)), 2)} for n, src, pct in PUBLISHED_LIBERO]
    table = {"suites": order, "runs": runs, "modes": modes, "published": published}
    if experts:
        expert = expert_cells(experts, list(expert_names or [str(i) for i in range(len(experts))]))
        table["expert"], table["expert_runs"] = expert["cells"], expert["runs"]
        both = list(runs) + [s for s in expert["runs"] if s not in runs]
        table["suites"] = [s for s in SUITE_COLUMNS if s in both] + [s for s in both if s not in SUITE_COLUMNS]
    return table


def print_suite_table(table: dict) -> None:
    """The four-suite table: a cell is success (with * when the run left tasks out), speed-up
    against dense (a range over pooled runs) and main passes per chunk."""
    def cell(c):
        if c is None:
            return "-"
        out = f"{100 * c['success_rate']:.1f}%{'' if c['all_tasks'] else '*'}"
        if c["speedup_vs_dense"]:
            lo, hi = min(c["speedup_vs_dense"]), max(c["speedup_vs_dense"])
            out += f" {lo:.2f}x" if abs(hi - lo) < 0.005 else f" {lo:.2f}-{hi:.2f}x"
        if c["main_passes_per_chunk"] is not None:
            out += f" {c['main_passes_per_chunk']:.2f}p"
        if c.get("vs_dense") and c["vs_dense"].get("mcnemar_p") is not None:
            out += f" (p={c['vs_dense']['mcnemar_p']:.2f})"
        return out

    suites = table["suites"]
    rows = [[m] + [cell(cells.get(s)) for s in suites]
            + ["-" if cells["average"] is None else f"{100 * cells['average']:.1f}%"]
            for m, cells in table["modes"].items()]
    if table.get("expert"):
        cells = table["expert"]
        rows.append(["scripted expert"] + [cell(cells.get(s)) for s in suites]
                    + ["-" if cells["average"] is None else f"{100 * cells['average']:.1f}%"])
    published = [[f"{p['name']} ({p['source']})"] + [f"{p['success_pct'][s]:.1f}%" if s in p["success_pct"] else "-"
                                                     for s in suites] + [f"{p['average']:.1f}%"]
                 for p in table["published"]]
    header = ["mode"] + suites + ["average"]
    widths = [max(len(r[i]) for r in [header] + rows + published) for i in range(len(header))]

    def line(r):
        return " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
    print("\n" + line(header))
    for r in rows:
        print(line(r))
    print("published, from camera images (another observation than the state read here):")
    for r in published:
        print(line(r))
    print("A cell: success over the run's trials (* not every task of the suite), speed-up of the median "
          "latency per chunk against dense in the same run (a range over pooled runs), main passes per "
          "chunk, (p=) the exact McNemar test against dense on the same trials. average: over the four standard "
          "suites.")
    walls = []
    for s in suites:
        ev = next((c[s]["wall_seconds"] for c in table["modes"].values() if s in c and c[s].get("wall_seconds")), None)
        ex = (table.get("expert") or {}).get(s, {}).get("wall_seconds")
        if ev or ex:
            walls.append(f"{s}: " + ", ".join(([f"evaluation {ev / 60:.0f} min"] if ev else [])
                                               + ([f"expert collection {ex / 60:.0f} min"] if ex else [])))
    if walls:
        print("wall time: " + "; ".join(walls))
