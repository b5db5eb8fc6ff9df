"""DCT compression study of LIBERO action chunks: how much of a chunk the first DCT
coefficients hold, and what DCT keep-k (and FAST) cost in tokens and error.

Standalone companion of analyze_rvq_compression.py; it shares the DCT code
(compression_baselines.py). Not a pytest file (pytest collects only tests/).

    python test_dct_compression.py --data data/spatial_t0.hdf5 --json runs/dct_study.json
    python test_dct_compression.py --num_episodes 20     # collect scripted-expert demos first

Data: episodes are split by episode (never by chunk); the normalizer (q01/q99 -> [-1, 1]),
the DCT quantization ranges and the FAST BPE are fit on the training episodes and every
number is measured on the held-out episodes. Errors are MSE of normalized actions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

import cli
import collect_actions as ca
from cli import arg
from compression_baselines import BaselineConfig, baseline_curves, dct_time, error_stats, idct_time
from demos import chunk_actions, load_episodes, split_by_episode
from fileio import check_outputs
from rvq_tokenizer import ActionNormalizer

log = logging.getLogger("dct_study")

# The DESIGN.md reference: DCT keep-k on pi0.5 LIBERO actions (chunk 10, 256 bins).
REFERENCE_KEEP_K_MSE = {2: 0.0139, 3: 0.0069, 4: 0.0043}


@dataclass
class DCTStudyArgs:
    # data
    data: list[str] | None = arg(None, "demo files (data/demo_*/actions) or LeRobot folders; without it, "
                                       "collect with the scripted expert", nargs="+", metavar="PATH")
    task_suite: str = arg("libero_spatial", "suite to collect (without --data)")
    task_id: int = arg(0, "task to collect (without --data)")
    num_episodes: int = arg(20, "episodes to collect (without --data)")
    output: str = arg("runs/dct_study_demos.hdf5", "where collected demos go (reused when already there)",
                      metavar="PATH")
    seed: int = arg(0, "collection seed and split seed")
    workers: int = arg(1, "collection processes")
    # study
    chunk_size: int = arg(10, "steps per chunk")
    val_fraction: float = arg(0.3, "share of episodes held out")
    energy_coeffs: int = arg(3, "report energy in the first 1..N coefficients")
    fast_scales: list[float] = arg(None, "FAST: DCT coefficient scales", factory=lambda: [2.0, 5.0, 10.0, 20.0, 50.0],
                                   nargs="+")
    json: str | None = cli.json_arg()

    def __post_init__(self):
        cli.require(self.chunk_size >= 2, f"--chunk_size must be >= 2 for a DCT study, got {self.chunk_size}")
        cli.require(self.energy_coeffs >= 1, f"--energy_coeffs must be >= 1, got {self.energy_coeffs}")
        cli.require(0 < self.val_fraction < 1, f"--val_fraction must be in (0, 1), got {self.val_fraction}")


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(DCTStudyArgs, "Study DCT truncation (and FAST, binning) on LIBERO action chunks: "
                                        "error per kept coefficient and energy per coefficient (phase 1).")


def load_or_collect(args: DCTStudyArgs) -> tuple[list, dict]:
    """Episodes from --data, or freshly collected with the scripted expert. Returns (episodes, data info)."""
    files, summary = ca.demos_or_collect(args.data, args.output, task_suite=args.task_suite,
                                         task_id=[args.task_id], num_episodes=args.num_episodes, seed=args.seed,
                                         workers=args.workers)
    info = {"source": "files" if args.data else "collected", "files": files}
    if summary is not None:
        info["collection"] = summary
    episodes = load_episodes(files)
    if not episodes:
        raise ValueError(f"no successful episodes in {files}")
    return episodes, info


def energy_fractions(chunks_norm: np.ndarray, max_coeffs: int) -> np.ndarray:
    """Share of each dimension's energy in its first k DCT coefficients, k = 1..max_coeffs.

    chunks_norm: [M, T, D] -> [max_coeffs, D]; row k-1 = sum_{j<k} c_j^2 / sum_j c_j^2 over chunks.
    """
    c2 = dct_time(chunks_norm) ** 2  # [M, T, D]
    total = c2.sum(axis=(0, 1))
    total = np.where(total > 0, total, 1.0)  # an all-zero dimension has nothing to hold
    return np.stack([c2[:, :k].sum(axis=(0, 1)) / total for k in range(1, max_coeffs + 1)])


def truncation_mse(chunks_norm: np.ndarray, keep: int) -> float:
    """MSE of plain DCT truncation (no quantization) keeping `keep` coefficients. chunks: [M, T, D]."""
    c = dct_time(chunks_norm)
    c[:, keep:] = 0
    return error_stats(chunks_norm, idct_time(c))["mse"]


def prepare_chunks(episodes, args):
    """Split by episode, fit the normalizer on training episodes; returns train/test chunks."""
    train_eps, test_eps = split_by_episode(episodes, args.val_fraction, seed=args.seed)
    train_raw = chunk_actions(train_eps, args.chunk_size)
    test_raw = chunk_actions(test_eps, args.chunk_size)
    if len(train_raw) == 0 or len(test_raw) == 0:
        raise ValueError(f"episodes are shorter than --chunk_size {args.chunk_size}: no chunks to study")
    normalizer = ActionNormalizer(train_raw.shape[-1]).fit(train_raw)
    norm = lambda a: normalizer.normalize(torch.as_tensor(a)).numpy().astype(np.float64)
    denorm = lambda a: normalizer.denormalize(torch.as_tensor(a, dtype=torch.float32)).numpy()
    split = {"train_episodes": len(train_eps), "test_episodes": len(test_eps),
             "train_chunks": int(len(train_raw)), "test_chunks": int(len(test_raw))}
    return norm(train_raw), norm(test_raw), test_raw, denorm, split


def print_report(r: dict) -> None:
    d = r["data"]
    print(f"\nDCT study: {d['test_chunks']} held-out chunks from {d['test_episodes']} episodes "
          f"({d['source']}: {', '.join(d['files'])}), chunk {d['chunk_size']}, normalized actions")
    print(f"{'keep k':>6} {'tokens':>7} {'bits':>6} {'MSE (256 bins)':>15} {'MSE (trunc.)':>13} "
          f"{'max|err|':>9} {'ratio tok':>9} {'pi0.5 ref':>9}")
    for p in r["keep_k"]:
        ref = r["reference_keep_k_mse_pi05"].get(p["keep"])
        print(f"{p['keep']:>6} {p['tokens_per_chunk']:>7.0f} {p['bits_per_chunk']:>6.0f} {p['mse']:>15.6f} "
              f"{p['mse_truncation_only']:>13.6f} {p['max_abs_err']:>9.4f} {p['compression_ratio_tokens']:>9.2f} "
              f"{'' if ref is None else f'{ref:.4f}':>9}")
    print("\nFAST (DCT + BPE) and 256-bin binning on the same chunks:")
    print(f"{'method':>12} {'tokens':>7} {'bits':>7} {'MSE':>10} {'decode fails':>12} {'clipped':>8}")
    for p in r["fast"] + r["binning"]:
        print(f"{p['method']:>12} {p['tokens_per_chunk']:>7.1f} {p['bits_per_chunk']:>7.1f} {p['mse']:>10.6f} "
              f"{p['decode_failures']:>12} {p['clipped_values']:>8}")
    for p in r["skipped"]:
        print(f"{p['method']:>12} skipped: {p['reason']}")
    print("\nShare of each dimension's energy in the first k DCT coefficients:")
    dims = len(next(iter(r["energy_first_coeffs"].values())))
    print(f"{'k':>4} " + " ".join(f"{'dim ' + str(i):>7}" for i in range(dims)))
    for k, row in r["energy_first_coeffs"].items():
        print(f"{k:>4} " + " ".join(f"{v:>7.4f}" for v in row))

def main(args: DCTStudyArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--json": args.json, "--output": None if args.data else args.output}, {"--data": args.data})
    episodes, data = load_or_collect(args)
    train_n, test_n, test_raw, denorm, split = prepare_chunks(episodes, args)
    data.update(split, chunk_size=args.chunk_size, action_dim=int(test_raw.shape[-1]))
    cfg = BaselineConfig(fast_scales=tuple(args.fast_scales), bin_counts=(256,))
    curves, skipped = baseline_curves(train_n, test_n, test_raw, denorm, cfg, progress=lambda j: cli.progress(j, desc="codecs"))
    for point in curves["dct"]:
        point["mse_truncation_only"] = truncation_mse(test_n, point["keep"])
    k_max = min(args.energy_coeffs, args.chunk_size)
    energy = energy_fractions(test_n, k_max)
    result = {"data": data, "keep_k": curves["dct"], "fast": curves["fast"], "binning": curves["binning"],
              "skipped": skipped,
              "energy_first_coeffs": {f"k{k + 1}": energy[k].tolist() for k in range(k_max)},
              "reference_keep_k_mse_pi05": REFERENCE_KEEP_K_MSE}
    print_report(result)
    cli.save_json(args.json, result, log)
    return result



if __name__ == "__main__":
    cli.run(main, build_parser())
