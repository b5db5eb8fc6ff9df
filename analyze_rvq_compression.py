"""Phase 1 analysis: reconstruction error of a residual tokenizer against the number of
layers, on episodes it never saw, beside DCT keep-k, FAST and per-dimension binning at
matching budgets.

    python analyze_rvq_compression.py --model runs/tok/rvq_tokenizer.pt --json runs/tok/analysis.json \
        --plot runs/tok/analysis.png                      # collects 20 fresh held-out episodes
    python analyze_rvq_compression.py --model rvq_tokenizer.pt --data data/test_demos.hdf5

Test data: without --data, fresh scripted-expert episodes are collected from LIBERO's
held-out init states (the evaluation trials) with a seed whose episode seeds are disjoint
from every episode recorded in the checkpoint's provenance; both are checked. With --data,
the given files are used and any episode the tokenizer trained or validated on is dropped
(and counted). Test and baseline chunks are of the sequence the tokenizer was trained on
(its provenance's --targets: the executed actions, or the expert's own commands). The
baselines are fit on the tokenizer's own training episodes (from the files its provenance
names) and evaluated on the same test chunks, in the same normalized units (the tokenizer's
q01/q99 normalizer).

Definitions: MSE is the mean over chunks of the per-chunk mean squared error (mse_std its
standard deviation over chunks), in normalized units unless named _raw; a token from a
vocabulary of V symbols costs log2(V) bits; compression_ratio_bits = 32 * T * D / bits,
compression_ratio_tokens = T * D / tokens (FAST's: 256-bin tokens over tokens).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import cli
import collect_actions as ca
from cli import arg
from compression_baselines import BaselineConfig, baseline_curves, compression_ratios, error_stats
from demos import TARGETS, chunk_actions, episode_targets, load_episodes
from fileio import check_outputs, save_figure
from rvq_tokenizer import code_usage, load_tokenizer

log = logging.getLogger("analyze_rvq")

# Thresholds of the original guide's hypothesis (normalized actions).
COARSE_MSE_THRESHOLD = 0.01   # "layers 1-2 alone reach MSE < 0.01"
FINE_MSE_THRESHOLD = 0.001    # "all layers reach MSE < 0.001"; also where bar 1's budget range ends
# A test value this far outside the normalizer's [-1, 1] (fit on the training data) means the
# test actions leave the training distribution (another expert version, task or robot).
OUT_OF_RANGE_NORMALIZED = 3.0
# Fresh-collection seeds start here (plus an offset) so they are far from usual training seeds.
FRESH_SEED_BASE = 100_000


@dataclass
class AnalysisArgs:
    model: str = arg("rvq_tokenizer.pt", "tokenizer checkpoint", metavar="PATH")
    # test data
    data: list[str] | None = arg(None, "test demo files or LeRobot folders (episodes the tokenizer saw are "
                                       "dropped); without it, collect fresh held-out episodes", nargs="+",
                                 metavar="PATH")
    task_suite: str | None = arg(None, "suite to collect (default: the checkpoint's, else libero_spatial)")
    task_id: int | None = arg(None, "task to collect (default: the checkpoint's, else 0)")
    num_episodes: int = arg(20, "fresh episodes to collect")
    seed: int | None = arg(None, "collection seed (default: the first one disjoint from the checkpoint's)")
    workers: int = arg(2, "collection processes")
    output: str | None = arg(None, "where fresh demos go (default: beside --json, else runs/)", metavar="PATH")
    device: str = cli.device_arg()
    # baselines
    fast_scales: list[float] = arg(None, "FAST: DCT coefficient scales (one curve point each)",
                                   factory=lambda: list(BaselineConfig.fast_scales), nargs="+")
    fast_vocab_size: int = arg(BaselineConfig.fast_vocab_size, "FAST: BPE vocabulary size")
    bin_counts: list[int] = arg(None, "binning: bins per dimension (one curve point each)",
                                factory=lambda: list(BaselineConfig.bin_counts), nargs="+")
    # outputs
    json: str | None = cli.json_arg()
    plot: str | None = arg(None, "write the figure (PNG) to this path", metavar="PNG")

    def __post_init__(self):
        self.device = str(cli.resolve_device(self.device))
        cli.require(self.num_episodes >= 1, f"--num_episodes must be >= 1, got {self.num_episodes}")
        cli.require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(AnalysisArgs, "Measure a tokenizer's error against its number of layers on episodes it "
                                        "never saw, beside DCT, FAST and binning at matching budgets (phase 1).")


# ------------------------------------------------------------------------- provenance


def _episode_key(e, by_content: bool = True) -> tuple:
    """Identity of an episode independent of where its file lives now: its content
    (``demos.content_id``), or, for a checkpoint written before content ids were recorded,
    (key, suite, task, seed, init state)."""
    get = (lambda k: e[k]) if isinstance(e, dict) else (lambda k: getattr(e, k))
    if by_content:
        return (str(get("content_id")),)
    return (str(get("key")), str(get("task_suite")), int(get("task_id")), int(get("seed")),
            int(get("init_state_id")))


def by_content(seen: list[dict]) -> bool:
    """Whether the checkpoint recorded its episodes' content ids (then they identify them)."""
    return bool(seen) and all(e.get("content_id") for e in seen)


def seen_episodes(provenance: dict, path: str) -> dict:
    """The checkpoint's training and validation episodes: {"train": [...], "val": [...]}."""
    data = provenance.get("data")
    if not isinstance(data, dict) or "train_episodes" not in data:
        raise ValueError(f"{path}: provenance has no data.train_episodes; cannot tell which "
                         "episodes the tokenizer saw (retrain with train_rvq_tokenizer.py)")
    return {"train": list(data["train_episodes"]), "val": list(data.get("val_episodes", []))}


def choose_fresh_seed(requested, seen: list[dict], task_id: int, num_episodes: int,
                      provenance_seed) -> tuple[int, list[int]]:
    """A collection seed whose episode seeds avoid every seen episode's seed."""
    taken = {int(e["seed"]) for e in seen}
    base_taken = {int(provenance_seed)} if provenance_seed is not None else set()

    def ok(s):
        seeds = [ca.episode_seed(s, task_id, i) for i in range(num_episodes)]
        return (s not in base_taken and not taken.intersection(seeds)), seeds

    if requested is not None:
        good, seeds = ok(requested)
        if not good:
            raise ValueError(f"--seed {requested} reuses a seed of the tokenizer's training data; pick another")
        return requested, seeds
    for s in range(FRESH_SEED_BASE, FRESH_SEED_BASE + 1000):
        good, seeds = ok(s)
        if good:
            return s, seeds
    raise RuntimeError("no collection seed disjoint from the checkpoint's episodes in 1000 tries")


def fresh_test_episodes(args, seen: list[dict], provenance: dict) -> tuple[list, dict]:
    """Collect held-out episodes disjoint (seeds and init states) from the checkpoint's."""
    used_states = {int(e["init_state_id"]) for e in seen
                   if e["task_suite"] == args.task_suite and int(e["task_id"]) == args.task_id}
    init_states = [i for i in ca.HELD_OUT_INIT_STATES if i not in used_states]
    if not init_states:
        raise ValueError(f"every held-out init state of {args.task_suite} task {args.task_id} was used "
                         "to train this tokenizer: pass --data with other episodes")
    prov_seed = (provenance.get("args") or {}).get("seed", provenance.get("seed"))
    seed, ep_seeds = choose_fresh_seed(args.seed, seen, args.task_id, args.num_episodes, prov_seed)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else "runs",
                                         f"analysis_{args.task_suite}_t{args.task_id}_seed{seed}.hdf5")
    log.info("collecting %d fresh episodes of %s task %d: init states %d..%d, seed %d -> %s",
             args.num_episodes, args.task_suite, args.task_id, init_states[0], init_states[-1], seed, output)
    summary = ca.collect(ca.CollectArgs(task_suite=args.task_suite, task_id=[args.task_id],
                                        num_episodes=args.num_episodes, output=output, init_states=init_states,
                                        seed=seed, workers=args.workers, overwrite=True))
    episodes = load_episodes([output])
    got_seeds = {e.seed for e in episodes}
    got_states = {e.init_state_id for e in episodes}
    seen_seeds = {int(e["seed"]) for e in seen}
    # checked on what was written, not only on what was asked for
    if got_seeds & seen_seeds or got_states & used_states:
        raise RuntimeError(f"fresh episodes in {output} overlap the tokenizer's data "
                           f"(seeds {sorted(got_seeds & seen_seeds)}, init states {sorted(got_states & used_states)})")
    if not episodes:
        raise RuntimeError(f"none of the {summary['episodes']} fresh episodes in {output} succeeded")
    # like training, the test uses successful demonstrations only; the failures are counted
    info = {"source": "fresh_collection", "files": [output], "collection_seed": seed,
            "collected_episodes": summary["episodes"], "failed_episodes_excluded": summary["episodes"] - len(episodes),
            "init_states": init_states, "episode_seeds": ep_seeds,
            "seeds_disjoint_from_checkpoint": True, "init_states_disjoint_from_checkpoint": True,
            "checkpoint_init_states": sorted(used_states), "collection": summary}
    return episodes, info


def file_test_episodes(args, seen: list[dict]) -> tuple[list, dict]:
    """Episodes of --data files, minus any the tokenizer trained or validated on."""
    episodes = load_episodes(args.data)
    content = by_content(seen)
    seen_keys = {_episode_key(e, content) for e in seen}
    kept = [e for e in episodes if _episode_key(e, content) not in seen_keys]
    dropped = len(episodes) - len(kept)
    if dropped:
        log.warning("dropped %d of %d episodes of --data that the tokenizer trained or validated on",
                    dropped, len(episodes))
    if not kept:
        raise ValueError(f"every episode in {args.data} was seen by the tokenizer in training; "
                         "give held-out episodes or omit --data to collect fresh ones")
    seen_states = {(e["task_suite"], int(e["task_id"]), int(e["init_state_id"])) for e in seen}
    kept_states = {(e.task_suite, e.task_id, e.init_state_id) for e in kept if e.init_state_id >= 0}
    info = {"source": "files", "files": list(args.data), "excluded_seen_episodes": dropped,
            "seeds_disjoint_from_checkpoint": not ({e.seed for e in kept if e.seed >= 0}
                                                   & {int(e["seed"]) for e in seen}),
            "init_states_disjoint_from_checkpoint": not (kept_states & seen_states),
            "init_states": sorted({e.init_state_id for e in kept})}
    if kept_states & seen_states:
        log.warning("some test episodes start from init states the tokenizer trained on (other seeds): %s",
                    sorted(kept_states & seen_states)[:10])
    return kept, info


def checkpoint_targets(provenance: dict) -> str:
    """Which action sequence the tokenizer was trained on (``train_rvq_tokenizer.py --targets``);
    checkpoints written before the flag existed trained on the executed ``actions``."""
    targets = (provenance.get("args") or {}).get("targets") or "actions"
    if targets not in TARGETS:
        raise ValueError(f"checkpoint provenance names targets {targets!r}, expected one of {TARGETS}")
    return targets


def episodes_of_targets(episodes: list, targets: str) -> tuple[list, int]:
    """Test episodes with ``actions`` set to what the tokenizer was trained to encode.

    For ``expert_actions``: a perturbed episode's recorded expert commands; an episode collected
    without ``--perturb`` executed the expert's commands, so its ``actions`` already are them.
    Returns the episodes and how many of them used recorded ``expert_actions``."""
    if targets == "actions":
        return episodes, 0
    out = [replace(e, actions=e.expert_actions) if e.expert_actions is not None else e for e in episodes]
    return out, sum(e.expert_actions is not None for e in episodes)


def training_chunks(provenance: dict, train_seen: list[dict], chunk_size: int, path: str) -> np.ndarray:
    """Raw chunks [M, T, D] of the tokenizer's training episodes (to fit the baselines), of the
    action sequence the tokenizer trained on."""
    files = sorted({e["source"] for e in train_seen} | set(provenance["data"].get("files", [])))
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ValueError(f"{path}: the baselines are fit on the tokenizer's training episodes, but "
                         f"file(s) {missing} named in its provenance are missing")
    content = by_content(train_seen)
    wanted = {_episode_key(e, content) for e in train_seen}
    episodes = [e for e in load_episodes(files, only_success=False) if _episode_key(e, content) in wanted]
    if len(episodes) != len(wanted):
        raise ValueError(f"{path}: found {len(episodes)} of the {len(wanted)} training episodes "
                         f"named in its provenance in {files}")
    targets = checkpoint_targets(provenance)
    episodes = [replace(e, actions=episode_targets(e, targets)) for e in episodes]
    return chunk_actions(episodes, chunk_size)


# ------------------------------------------------------------------------- measurements


def test_range_report(test_norm: np.ndarray) -> dict:
    """Per-dimension max |normalized test action| and share beyond [-1.1, 1.1]; warns when a
    dimension goes far past the training range (then errors there dominate every mean)."""
    absx = np.abs(test_norm).reshape(-1, test_norm.shape[-1])
    report = {"max_abs_normalized": absx.max(0).tolist(),
              "fraction_beyond_1_1": (absx > 1.1).mean(0).tolist()}
    far = [d for d, v in enumerate(report["max_abs_normalized"]) if v > OUT_OF_RANGE_NORMALIZED]
    report["dims_far_outside_training_range"] = far
    if far:
        log.warning("test actions of dimension(s) %s reach %s in normalized units (training q01..q99 = "
                    "[-1, 1]): the test data is not from the training distribution", far,
                    [round(report["max_abs_normalized"][d], 1) for d in far])
    return report



@torch.no_grad()
def rvq_layer_points(model, test_raw: np.ndarray, test_norm: np.ndarray, device) -> tuple[list, torch.Tensor, list]:
    """Per-prefix metrics. test_raw/test_norm: [B, T, D]. Returns (points for l = 1..L,
    codes [B, T', L], reconstructions [L] of normalized [B, T, D] arrays)."""
    c = model.config
    codes = torch.cat([model.encode(torch.as_tensor(test_raw[i:i + 4096], device=device))
                       for i in range(0, len(test_raw), 4096)])
    points, recons = [], []
    for l in range(1, c.num_layers + 1):
        raw = torch.cat([model.decode(codes[i:i + 4096, :, :l]) for i in range(0, len(codes), 4096)])
        norm = model.normalize(raw).cpu().numpy()
        stats = error_stats(test_norm, norm)
        raw_stats = error_stats(test_raw, raw.cpu().numpy())
        tokens, bits = float(c.latent_steps * l), model.bits_per_chunk(l)
        points.append({"layers": l, "tokens_per_chunk": tokens, "bits_per_chunk": bits,
                       **compression_ratios(test_raw.shape[1:], tokens, bits), **stats,
                       "mse_raw": raw_stats["mse"], "max_abs_err_raw": raw_stats["max_abs_err"]})
        recons.append(norm)
        # what this layer adds: a layer that uses its codes but gains ~0 is dead in effect
        prev = points[-2]["mse"] if l > 1 else None
        points[-1]["layer_gain_relative"] = None if prev is None else (prev - stats["mse"]) / prev
    return points, codes.cpu(), recons


def autoencoder_floor(model, test_raw: np.ndarray, test_norm: np.ndarray, device) -> dict:
    """Error with the latent unquantized (``RVQTokenizer.autoencode``): where the layers level off."""
    raw = torch.cat([model.autoencode(torch.as_tensor(test_raw[i:i + 4096], device=device))
                     for i in range(0, len(test_raw), 4096)])
    stats = error_stats(test_norm, model.normalize(raw).cpu().numpy())
    return {"mse": stats["mse"], "mse_std": stats["mse_std"],
            "mse_raw": error_stats(test_raw, raw.cpu().numpy())["mse"]}


def bar1_check(rvq: list, baselines: dict, threshold: float = FINE_MSE_THRESHOLD) -> dict:
    """Bar 1: at every budget from one RVQ layer up to B* (the budget where DCT first reaches
    MSE < `threshold`), RVQ's MSE is below every baseline's MSE at the same or a larger budget.

    RVQ's MSE at budget b is that of its best prefix with at most b bits. Checked (a) at each
    RVQ prefix with bits <= B* against each baseline's cheapest point with at least as many
    bits, and (b) at each baseline point with bits in [one RVQ layer, B*]. Points of (b) past
    RVQ's largest budget (more bits than all L layers use) are where RVQ has no operating point
    of its own: they are checked and reported as `beyond_rvq_range`, and `passed` needs them
    too; `passed_within_rvq_range` leaves them out.
    """
    dct_hit = [p for p in baselines["dct"] if p["mse"] < threshold]
    end = dct_hit[0]["bits_per_chunk"] if dct_hit else baselines["dct"][-1]["bits_per_chunk"]
    start, rvq_max = rvq[0]["bits_per_chunk"], rvq[-1]["bits_per_chunk"]
    pairs = {}

    def compare(r, family, p, budget):
        key = (r["layers"], p["method"], budget)
        if key not in pairs:
            pairs[key] = {"budget_bits": budget, "rvq_layers": r["layers"], "rvq_bits": r["bits_per_chunk"],
                          "rvq_mse": r["mse"], "baseline": p["method"], "family": family,
                          "baseline_bits": p["bits_per_chunk"], "baseline_mse": p["mse"],
                          "rvq_better": r["mse"] < p["mse"], "beyond_rvq_range": budget > rvq_max}

    for r in (r for r in rvq if r["bits_per_chunk"] <= end):
        for family, points in baselines.items():
            larger = [p for p in points if p["bits_per_chunk"] >= r["bits_per_chunk"]]
            if larger:
                compare(r, family, larger[0], r["bits_per_chunk"])
    for family, points in baselines.items():
        for p in (p for p in points if start <= p["bits_per_chunk"] <= end):
            best = min((r for r in rvq if r["bits_per_chunk"] <= p["bits_per_chunk"]), key=lambda r: r["mse"])
            compare(best, family, p, p["bits_per_chunk"])
    comparisons = sorted(pairs.values(), key=lambda c: (c["budget_bits"], c["baseline"]))
    failures = [c for c in comparisons if not c["rvq_better"]]
    inside = [c for c in comparisons if not c["beyond_rvq_range"]]
    return {"passed": bool(comparisons) and not failures and start <= end,
            "passed_within_rvq_range": bool(inside) and all(c["rvq_better"] for c in inside) and start <= end,
            "budget_range_bits": [start, end], "rvq_max_bits": rvq_max,
            "dct_reaches_threshold": bool(dct_hit), "threshold_mse": threshold,
            "num_comparisons": len(comparisons), "num_failures": len(failures),
            "failures": failures, "comparisons": comparisons}


def hypothesis(rvq: list) -> dict:
    """The seed's summary, computed from the per-layer MSE (normalized units)."""
    mse = [p["mse"] for p in rvq]
    below = [p["layers"] for p in rvq if p["mse"] < COARSE_MSE_THRESHOLD]
    coarse = mse[0] - mse[1] if len(mse) > 1 else 0.0   # what layer 2 adds to layer 1
    fine = mse[1] - mse[-1] if len(mse) > 2 else 0.0     # what layers 3..L add to layers 1-2
    return {
        "fewest_layers_mse_below_0_01": below[0] if below else None,
        "layers_1_2_below_0_01": len(mse) > 1 and mse[1] < COARSE_MSE_THRESHOLD,
        "all_layers_below_0_001": mse[-1] < FINE_MSE_THRESHOLD,
        "coarse_improvement": coarse, "coarse_improvement_relative": coarse / mse[0],
        "fine_improvement": fine, "fine_improvement_relative": fine / mse[1] if len(mse) > 1 else 0.0,
        "coarse_to_fine_structure": coarse > fine,
        "error_falls_with_every_layer": all(a > b for a, b in zip(mse, mse[1:])),
        "mse_layer_1": mse[0], "mse_layers_1_2": mse[1] if len(mse) > 1 else None, "mse_all_layers": mse[-1],
    }


# ------------------------------------------------------------------------- plots


def example_chunk(test_norm: np.ndarray, recons: list) -> int:
    """Index of a representative chunk: the median one-layer error (not a cherry-pick)."""
    err = ((recons[0] - test_norm) ** 2).mean(axis=(1, 2))
    return int(np.argsort(err)[len(err) // 2])


def plot_analysis(r: dict, test_norm: np.ndarray, recons: list, path: str) -> None:
    """Two rows: MSE vs layers | compression vs layers | rate-distortion | code usage, then
    one chunk (its four most active dimensions) reconstructed with 1, 2, 4 and L layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rvq, L = r["rvq"], len(r["rvq"])
    layers = [p["layers"] for p in rvq]
    fig, ax = plt.subplots(2, 4, figsize=(20, 9))
    a = ax[0, 0]
    a.semilogy(layers, [p["mse"] for p in rvq], "o-", label="RVQ (normalized)")
    a.axhline(COARSE_MSE_THRESHOLD, ls="--", c="gray", label=f"MSE {COARSE_MSE_THRESHOLD}")
    a.axhline(FINE_MSE_THRESHOLD, ls=":", c="gray", label=f"MSE {FINE_MSE_THRESHOLD}")
    if r["model"]["config"].get("encoder", "mlp") == "mlp":  # without an encoder there is no floor
        a.axhline(r["autoencoder_floor"]["mse"], ls="-.", c="C3", label="latent unquantized")
    a.set(xlabel="layers used", ylabel="MSE (log)", title="Reconstruction error vs layers")
    a.legend()
    a = ax[0, 1]
    a.plot(layers, [p["compression_ratio_bits"] for p in rvq], "o-", label="float32 bits / token bits")
    a.plot(layers, [p["compression_ratio_tokens"] for p in rvq], "s-", label="256-bin tokens / tokens (FAST)")
    a.set(xlabel="layers used", ylabel="compression ratio", title="Compression vs layers", yscale="log")
    a.legend()
    a = ax[0, 2]
    a.semilogy([p["bits_per_chunk"] for p in rvq], [p["mse"] for p in rvq], "o-", lw=2, label="RVQ (ours)")
    for family, marker in (("dct", "s"), ("fast", "^"), ("binning", "v")):
        pts = r["baselines"][family]
        a.semilogy([p["bits_per_chunk"] for p in pts], [p["mse"] for p in pts], marker + "--", label=family)
    a.set(xlabel="bits per chunk (log)", ylabel="MSE (log)", title="Rate-distortion (held-out chunks)", xscale="log")
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.legend()
    a = ax[0, 3]
    a.bar(layers, [u["used_fraction"] for u in r["code_usage"]])
    for u in r["code_usage"]:
        a.text(u["layer"], u["used_fraction"], f"ppl {u['perplexity']:.0f}", ha="center", va="bottom", fontsize=8)
    a.set(xlabel="layer", ylabel="share of codebook used", title="Per-layer code usage", ylim=(0, 1.1))
    idx = example_chunk(test_norm, recons)
    x = test_norm[idx]  # [T, D]
    dims = np.argsort(x.std(axis=0))[::-1][:4]
    shown = sorted({1, min(2, L), min(4, L), L})
    for a, d in zip(ax[1], dims):
        a.plot(x[:, d], "k-", lw=2.5, label="original")
        for l in shown:
            a.plot(recons[l - 1][idx, :, d], "--", label=f"{l} layer{'s' if l > 1 else ''}")
        a.set(xlabel="step", ylabel="normalized action", title=f"chunk {idx}, dim {d}")
        a.legend(fontsize=8)
    fig.suptitle(f"{r['data']['source']}: {r['data']['chunks']} chunks, {r['data']['episodes']} episodes")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------- report


def print_report(r: dict) -> None:
    d = r["data"]
    src = ("FRESH episodes collected now (seeds and init states disjoint from the checkpoint's)"
           if d["source"] == "fresh_collection" else f"the given files (minus {d['excluded_seen_episodes']} seen episodes)")
    print(f"\nTest data: {src}: {d['episodes']} episodes, {d['chunks']} chunks of {d['chunk_size']} steps "
          f"from {', '.join(d['files'])}")
    if d["targets"] != "actions":
        print(f"  sequence: {d['targets']}, as the tokenizer was trained ({d['episodes_with_expert_actions']} "
              "episodes recorded them; the others were not perturbed, so they executed the expert's commands)")
    if d["test_range"]["dims_far_outside_training_range"]:
        print(f"  WARNING: dimension(s) {d['test_range']['dims_far_outside_training_range']} of the test actions go "
              f"far outside the training range (max |normalized| "
              f"{max(d['test_range']['max_abs_normalized']):.1f}): not the training distribution")
    if d.get("failed_episodes_excluded"):
        print(f"  ({d['failed_episodes_excluded']} of {d['collected_episodes']} collected episodes failed "
              "the task and are not used, as in training)")
    print(f"\n{'layers':>6} {'tokens':>6} {'bits':>6} {'MSE':>10} {'MSE std':>10} {'median':>10} {'MSE raw':>10} "
          f"{'max|err|':>9} {'ratio bits':>10} {'ratio tok':>9} {'usage':>6} {'gain':>6}")
    for p, u in zip(r["rvq"], r["code_usage"]):
        gain = "" if p["layer_gain_relative"] is None else f"{100 * p['layer_gain_relative']:.1f}%"
        print(f"{p['layers']:>6} {p['tokens_per_chunk']:>6.0f} {p['bits_per_chunk']:>6.0f} {p['mse']:>10.6f} "
              f"{p['mse_std']:>10.6f} {p['mse_median']:>10.6f} {p['mse_raw']:>10.3g} {p['max_abs_err']:>9.4f} "
              f"{p['compression_ratio_bits']:>10.1f} {p['compression_ratio_tokens']:>9.2f} {u['used_fraction']:>6.2f} "
              f"{gain:>6}")
    if r["model"]["config"].get("encoder", "mlp") == "mlp":
        print(f"{'floor':>6} {'':>6} {'':>6} {r['autoencoder_floor']['mse']:>10.6f} {r['autoencoder_floor']['mse_std']:>10.6f}"
              "  <- latent unquantized: where the layers level off")
    elif r["model"]["config"].get("encoder") == "pca":
        print(f"{'floor':>6}  none: the encoder is the chunk's principal axes, orthogonal (unquantized chunks "
              f"decode with MSE {r['autoencoder_floor']['mse']:.1e})")
    else:
        print(f"{'floor':>6}  none: no encoder, the chunk itself is quantized")
    print(f"\n{'baseline':>12} {'tokens':>7} {'bits':>7} {'MSE':>10} {'median':>10} {'MSE raw':>10} {'fails':>6} {'clipped':>8}")
    for family in ("dct", "fast", "binning"):
        for p in r["baselines"][family]:
            print(f"{p['method']:>12} {p['tokens_per_chunk']:>7.1f} {p['bits_per_chunk']:>7.1f} {p['mse']:>10.6f} "
                  f"{p['mse_median']:>10.6f} {p['mse_raw']:>10.3g} {p['decode_failures']:>6} {p['clipped_values']:>8}")
    for s in r["baselines_skipped"]:
        print(f"{s['method']:>12} skipped: {s['reason']}")
    h, b = r["hypothesis"], r["bar1"]
    print("\nHypothesis (normalized MSE):")
    print(f"  fewest layers with MSE < {COARSE_MSE_THRESHOLD}: {h['fewest_layers_mse_below_0_01']}")
    print(f"  layers 1-2 alone below {COARSE_MSE_THRESHOLD}: {h['layers_1_2_below_0_01']} (MSE {h['mse_layers_1_2']:.6f})")
    print(f"  coarse improvement (layer 1 -> 2): {h['coarse_improvement']:.6f} ({100 * h['coarse_improvement_relative']:.1f}%); "
          f"fine improvement (layer 2 -> {len(r['rvq'])}): {h['fine_improvement']:.6f} "
          f"({100 * h['fine_improvement_relative']:.1f}%) -> coarse-to-fine: {h['coarse_to_fine_structure']}")
    print(f"  all layers below {FINE_MSE_THRESHOLD}: {h['all_layers_below_0_001']} (MSE {h['mse_all_layers']:.6f}); "
          f"error falls with every layer: {h['error_falls_with_every_layer']}")
    lo, hi = b["budget_range_bits"]
    print(f"\nBar 1 (RVQ below DCT, FAST and binning at >= budget, {lo:.0f}..{hi:.0f} bits): "
          f"{'PASS' if b['passed'] else 'FAIL'} ({b['num_comparisons'] - b['num_failures']}/{b['num_comparisons']} "
          f"comparisons); within RVQ's own budgets (<= {b['rvq_max_bits']:.0f} bits): "
          f"{'PASS' if b['passed_within_rvq_range'] else 'FAIL'}")
    for c in b["failures"]:
        print(f"  at {c['budget_bits']:.0f} bits: RVQ {c['rvq_layers']} layers ({c['rvq_bits']:.0f} bits, MSE "
              f"{c['rvq_mse']:.6f}) vs {c['baseline']} ({c['baseline_bits']:.1f} bits, MSE {c['baseline_mse']:.6f})"
              f"{'  [beyond RVQ range]' if c['beyond_rvq_range'] else ''}")
    print(f"\nwall time {r['timing']['total_s']:.1f} s (collection {r['timing']['collect_s']:.1f} s)")


def main(args: AnalysisArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--json": args.json, "--plot": args.plot, "--output": args.output},
                  {"--model": args.model, "--data": args.data})
    t0 = time.perf_counter()
    model, ckpt = load_tokenizer(args.model, map_location=args.device)
    c = model.config
    seen = seen_episodes(ckpt["provenance"], args.model)
    all_seen = seen["train"] + seen["val"]
    if args.data:
        episodes, data = file_test_episodes(args, all_seen)
    else:
        prov_args = ckpt["provenance"].get("args") or {}
        args.task_suite = args.task_suite or prov_args.get("task_suite") or "libero_spatial"
        args.task_id = args.task_id if args.task_id is not None else int(prov_args.get("task_id") or 0)
        episodes, data = fresh_test_episodes(args, all_seen, ckpt["provenance"])
    t_collect = time.perf_counter() - t0
    data["targets"] = checkpoint_targets(ckpt["provenance"])
    episodes, data["episodes_with_expert_actions"] = episodes_of_targets(episodes, data["targets"])
    test_raw = chunk_actions(episodes, c.chunk_size)
    if len(test_raw) == 0:
        raise ValueError(f"test episodes are shorter than the tokenizer's chunk size {c.chunk_size}")
    if test_raw.shape[-1] != c.action_dim:
        raise ValueError(f"test actions have dimension {test_raw.shape[-1]}, the tokenizer expects {c.action_dim}")
    data.update(episodes=len(episodes), chunks=int(len(test_raw)), chunk_size=c.chunk_size, action_dim=c.action_dim)
    log.info("test data: %s, %d episodes, %d chunks of %s", data["source"], len(episodes), len(test_raw),
             data["targets"])

    normalize = lambda a: model.normalize(torch.as_tensor(a, device=args.device)).cpu().numpy().astype(np.float64)
    denormalize = lambda a: model.denormalize(torch.as_tensor(a, dtype=torch.float32, device=args.device)).cpu().numpy()
    test_norm = normalize(test_raw)
    data["test_range"] = test_range_report(test_norm)
    rvq, codes, recons = rvq_layer_points(model, test_raw, test_norm, args.device)
    usage = code_usage(codes, model.layer_codebook_sizes())
    floor = autoencoder_floor(model, test_raw, test_norm, args.device)

    train_raw = training_chunks(ckpt["provenance"], seen["train"], c.chunk_size, args.model)
    cfg = BaselineConfig(fast_scales=tuple(args.fast_scales), fast_vocab_size=args.fast_vocab_size,
                         bin_counts=tuple(args.bin_counts))
    baselines, skipped = baseline_curves(normalize(train_raw), test_norm, test_raw, denormalize, cfg)
    data["baseline_train_chunks"] = int(len(train_raw))

    result = {"data": data, "model": {"path": args.model, "config": ckpt["config"]},
              "rvq": rvq, "autoencoder_floor": floor, "code_usage": usage,
              "baselines": baselines, "baselines_skipped": skipped,
              "hypothesis": hypothesis(rvq), "bar1": bar1_check(rvq, baselines)}
    if args.plot:
        plot_analysis(result, test_norm, recons, args.plot)
        log.info("wrote %s", args.plot)
    result["timing"] = {"total_s": time.perf_counter() - t0, "collect_s": t_collect}
    print_report(result)
    cli.save_json(args.json, result, log)
    return result


if __name__ == "__main__":
    cli.run(main, build_parser())
