"""Phase 1: train a residual tokenizer (RVQ or RFSQ) on LIBERO action chunks.

    python train_rvq_tokenizer.py --num_episodes 50                 # collect with the scripted expert, then train
    python train_rvq_tokenizer.py --data demos.hdf5 --quantizer rfsq # train on existing demo files
    python train_rvq_tokenizer.py --data demos.hdf5 --encoder none   # RVQ on the chunk itself, residual k-means

Chunks are cut from whole episodes and the validation split is made by episode, so no
validation chunk overlaps a training chunk. The checkpoint kept is the epoch with the best
validation error (geometric mean over prefixes 1..L of the normalized-action MSE), and it
records the data files, the train / validation episodes, the arguments, the seed and the
metrics. Beside it: ``<stem>_training_history.png`` and, when collecting, ``<stem>_demos.hdf5``.
With ``--encoder none`` there is nothing to train by gradient: the codebooks (and each code's
residual scale, unless ``--no_cell_scale``) are fit stage by stage by k-means on the training
chunks' leave-one-out residuals, and the plot shows train and validation MSE per layer.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

from collect_actions import TARGETS
from rvq_tokenizer import DEFAULT_BEAM_WIDTH, DIRECT_KMEANS_ITERS, ENCODERS, QUANTIZERS, RVQConfig, RVQTokenizer, code_usage, save_tokenizer

log = logging.getLogger("train_rvq_tokenizer")

# Encoder / decoder width per quantizer. On the main job's 50 episodes RFSQ at 64 reached
# layers 1-8 0.00066 on held-out episodes, fitting its training chunks five times better;
# at 32 it reaches 0.00041 (README, phase 1). RVQ meets the bar at 64 (0.00042).
DEFAULT_HIDDEN_DIM = {"rvq": 64, "rfsq": 32}

# k-means initialisation of the codebooks looks at this many training chunks (the first
# batches of a shuffled epoch); more adds time and little else.
KMEANS_INIT_CHUNKS = 4096


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="demo files (data/demo_*/actions) to train on; without it, collect first")
    g.add_argument("--task_suite", default="libero_spatial")
    g.add_argument("--task_id", type=int, default=0)
    g.add_argument("--num_episodes", type=int, default=50, help="episodes to collect (without --data)")
    g.add_argument("--chunk_size", type=int, default=10)
    g.add_argument("--targets", choices=TARGETS, default="actions",
                   help="train on the executed actions, or on the expert's own commands stored by a "
                        "perturbed collection (collect_actions.py --perturb)")
    g.add_argument("--val_fraction", type=float, default=0.1, help="share of episodes held out")
    g = p.add_argument_group("model")
    g.add_argument("--quantizer", choices=QUANTIZERS, default="rvq")
    g.add_argument("--encoder", choices=ENCODERS, default="mlp",
                   help="'none': RVQ on the normalized chunk itself (whole-chunk layers, then "
                        "step-group layers; see --chunk_layers), fit by greedy residual k-means (no "
                        "gradient training: the training flags are ignored)")
    g.add_argument("--chunk_layers", type=int, default=RVQConfig.chunk_layers,
                   help="encoder 'none': the first layers code the whole chunk (latent_steps stages "
                        "each), the rest code latent_steps groups of steps with one shared codebook")
    g.add_argument("--no_leave_one_out", action="store_true",
                   help="encoder 'none': fit each stage on the plain training residuals, which the "
                        "stages memorise, instead of the leave-one-out ones")
    g.add_argument("--no_cell_scale", action="store_true",
                   help="encoder 'none': no per-code residual scales (every stage codes the plain residual)")
    g.add_argument("--beam_width", type=int, default=None,
                   help=f"encoder 'none': paths kept by the beam search that encodes (1: the nearest "
                        f"code at every stage; default {DEFAULT_BEAM_WIDTH})")
    g.add_argument("--kmeans_iters", type=int, default=DIRECT_KMEANS_ITERS,
                   help="Lloyd iterations per codebook (encoder 'none'; the MLP tokenizer's "
                        "initialisation uses 10)")
    g.add_argument("--num_layers", type=int, default=8)
    g.add_argument("--codebook_size", type=int, default=256, help="K per RVQ layer")
    g.add_argument("--fsq_levels", type=int, nargs="+", default=list(RVQConfig.fsq_levels),
                   help="RFSQ levels per latent dimension (codebook = their product)")
    g.add_argument("--fsq_layer_scale", type=float, default=RVQConfig.fsq_layer_scale,
                   help="RFSQ: residual magnification per layer, in (1, min level]; 0 = the levels "
                        "(an exactly nested grid)")
    g.add_argument("--latent_steps", type=int, default=RVQConfig.latent_steps,
                   help="latent vectors per chunk; one layer costs latent_steps * log2(K) bits")
    g.add_argument("--hidden_dim", type=int, default=None,
                   help=f"encoder / decoder width (default: {DEFAULT_HIDDEN_DIM['rvq']} for rvq, "
                        f"{DEFAULT_HIDDEN_DIM['rfsq']} for rfsq, which over-fits 50 episodes at 64)")
    g.add_argument("--code_dim", type=int, default=RVQConfig.code_dim, help="RVQ code vector size")
    g.add_argument("--residual_dropout", type=float, default=0.1,
                   help="probability that a sample is cut after a random number of layers")
    g.add_argument("--prefix_loss_weight", type=float, default=RVQConfig.prefix_loss_weight)
    g.add_argument("--commitment_weight", type=float, default=RVQConfig.commitment_weight)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; the model's matrices are tiny, so more threads "
                        "mostly add contention on a shared machine")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="rvq_tokenizer.pt")
    g.add_argument("--json", default=None, metavar="PATH", help="write the measured numbers here")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.hidden_dim is None:
        args.hidden_dim = DEFAULT_HIDDEN_DIM[args.quantizer]
    return args


def output_path(output: str, suffix: str) -> str:
    """A file beside the checkpoint: rvq_tokenizer.pt -> rvq_tokenizer<suffix>."""
    return os.path.splitext(output)[0] + suffix


def config_from_args(args, action_dim: int) -> RVQConfig:
    return RVQConfig(
        action_dim=action_dim, chunk_size=args.chunk_size, latent_steps=args.latent_steps,
        hidden_dim=args.hidden_dim, code_dim=args.code_dim, quantizer=args.quantizer, encoder=args.encoder,
        chunk_layers=args.chunk_layers,
        cell_scale=False if args.no_cell_scale else None, beam_width=args.beam_width,
        num_layers=args.num_layers, codebook_size=args.codebook_size,
        fsq_levels=tuple(args.fsq_levels), fsq_layer_scale=args.fsq_layer_scale or None,
        residual_dropout=args.residual_dropout,
        prefix_loss_weight=args.prefix_loss_weight, commitment_weight=args.commitment_weight,
    )


def check_args(args) -> None:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.kmeans_iters < 1:
        raise ValueError(f"--kmeans_iters must be >= 1, got {args.kmeans_iters}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    config_from_args(args, action_dim=1)  # model flags fail here, before any data is read
    if args.data is None and args.num_episodes < 2:
        raise ValueError(f"--num_episodes must be >= 2 to hold out episodes, got {args.num_episodes}")


# --------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: RVQTokenizer, chunks: torch.Tensor) -> dict:
    """Per-prefix normalized MSE and per-layer code usage on chunks [N, T, D] (raw units)."""
    model.eval()
    mse = model.prefix_mse(chunks).tolist()
    usage = code_usage(model.encode(chunks), model.layer_codebook_sizes())
    return {"prefix_mse": mse, "usage": usage, "score": selection_score(mse)}


def selection_score(prefix_mse: list[float]) -> float:
    """Geometric mean over prefixes 1..L: every prefix counts by its relative error, so the
    selection does not ignore the fine layers whose MSE is orders of magnitude smaller."""
    return float(math.exp(np.mean(np.log(np.maximum(prefix_mse, 1e-12)))))


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.05):
    """LR factor per step: linear warm-up from 1/25 over the first 5% of steps, then cosine
    decay to 0 (the one-cycle shape; the fine layers keep improving while the LR decays)."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fit_residual_kmeans(config: RVQConfig, train_chunks: np.ndarray, val_chunks: np.ndarray, *,
                        iters: int, leave_one_out: bool = True, device: str = "cpu") -> tuple[RVQTokenizer, dict]:
    """Encoder 'none': fit every stage's codebook by k-means on the (leave-one-out) residuals
    all earlier stages leave on the training chunks [N, T, D] (raw units), in order
    (``StagedResidualQuantizer.fit``). Returns the model and the train and validation MSE per
    layer."""
    model = RVQTokenizer(config).to(device)
    train = torch.as_tensor(train_chunks, dtype=torch.float32, device=device)
    model.normalizer.fit(train.reshape(-1, config.action_dim))
    model.init_codebooks(train, iters, leave_one_out=leave_one_out)
    model.eval()
    return model, {"epoch": [], "best_epoch": 0, "kmeans_iters": iters, "leave_one_out": leave_one_out,
                   "cell_scale": config.cell_scale, "beam_width": config.beam_width,
                   "train_prefix_mse": model.prefix_mse(train).tolist(),
                   "val_prefix_mse": [model.prefix_mse(torch.as_tensor(val_chunks, dtype=torch.float32,
                                                                       device=device)).tolist()]}


def train_tokenizer(config: RVQConfig, train_chunks: np.ndarray, val_chunks: np.ndarray, *,
                    epochs: int, batch_size: int, lr: float, device: str = "cpu",
                    progress: bool = True) -> tuple[RVQTokenizer, dict]:
    """Train on train_chunks [N, T, D] (raw units); returns the model restored to the epoch
    with the best validation score, and the history (per-epoch losses, usage, val MSE)."""
    if config.encoder == "none":
        raise ValueError("encoder 'none' is fit by fit_residual_kmeans, not trained by gradient")
    model = RVQTokenizer(config).to(device)
    train = torch.as_tensor(train_chunks, dtype=torch.float32, device=device)
    val = torch.as_tensor(val_chunks, dtype=torch.float32, device=device)
    model.normalizer.fit(train.reshape(-1, config.action_dim))
    model.init_codebooks(train[torch.randperm(len(train), device=device)[:KMEANS_INIT_CHUNKS]])
    # buffers (codebooks, normalizer) are not parameters: the optimizer never touches them
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=device == "cpu")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps_per_epoch))
    history = {"epoch": [], "recon_loss": [], "prefix_loss": [], "commit_loss": [],
               "dead_codes_replaced": [], "train_usage": [], "val_prefix_mse": [],
               "val_usage": [], "val_score": []}
    best = {"score": float("inf"), "epoch": -1, "state": None}
    bar = tqdm(range(1, epochs + 1), desc=f"train {config.quantizer}", disable=not progress)
    for epoch in bar:
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)
        replaced, codes = 0, []
        for idx in torch.randperm(len(train), device=device).split(batch_size):
            out = model(train[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            sums += torch.stack([out.recon_loss, out.prefix_loss, out.commit_loss]).detach().double().cpu()
            replaced += sum(out.dead_codes_replaced)
            codes.append(out.codes)
        train_usage = code_usage(torch.cat(codes), model.layer_codebook_sizes())
        ev = evaluate(model, val)
        means = (sums / steps_per_epoch).tolist()
        for key, value in zip(("recon_loss", "prefix_loss", "commit_loss"), means):
            history[key].append(value)
        history["epoch"].append(epoch)
        history["dead_codes_replaced"].append(replaced)
        history["train_usage"].append([u["used_of_possible"] for u in train_usage])
        history["val_prefix_mse"].append(ev["prefix_mse"])
        history["val_usage"].append([u["used_of_possible"] for u in ev["usage"]])
        history["val_score"].append(ev["score"])
        if ev["score"] < best["score"]:
            best = {"score": ev["score"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        mse = ev["prefix_mse"]
        bar.set_postfix(recon=f"{means[0]:.2e}", val_L1=f"{mse[0]:.1e}", val_LL=f"{mse[-1]:.1e}")
        log.info("epoch %3d recon %.2e prefix %.2e vq %.2e | val MSE L1 %.2e L2 %.2e L%d %.2e | "
                 "usage %s | dead codes re-seeded %d", epoch, means[0], means[1], means[2], mse[0],
                 mse[min(1, len(mse) - 1)], len(mse), mse[-1],
                 " ".join(f"{u['used_fraction']:.2f}" for u in train_usage), replaced)
    model.load_state_dict(best["state"])
    model.eval()
    history["best_epoch"] = best["epoch"]
    return model, history


# --------------------------------------------------------------------------- data and outputs


def load_data(args) -> tuple[list, list[str]]:
    """Episodes to train on and the demo files they came from; collects first without --data."""
    import collect_actions

    files = list(args.data) if args.data else []
    if not files:
        demos = output_path(args.output, "_demos.hdf5")
        log.info("no --data: collecting %d scripted-expert episodes of %s task %d into %s",
                 args.num_episodes, args.task_suite, args.task_id, demos)
        summary = collect_actions.collect(args.task_suite, [args.task_id], args.num_episodes, demos,
                                          policy="scripted", seed=args.seed, progress=not args.no_progress)
        log.info("collected %d episodes, %d successful, in %.0f s", summary["episodes"],
                 summary["successes"], summary["wall_seconds"])
        files = [demos]
    episodes = collect_actions.load_episodes(files)
    if not episodes:
        raise ValueError(f"no successful episodes in {', '.join(files)}")
    episodes = [replace(e, actions=collect_actions.episode_targets(e, args.targets)) for e in episodes]
    return episodes, files


def save_history_plot(history: dict, path: str) -> None:
    """Training losses, validation MSE per prefix and code usage per layer, one figure; for
    encoder 'none' (no epochs), train and validation MSE per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history["epoch"]:
        fig, a = plt.subplots(figsize=(6, 4))
        layers = np.arange(1, len(history["train_prefix_mse"]) + 1)
        a.semilogy(layers, history["train_prefix_mse"], "o-", label="training chunks")
        a.semilogy(layers, history["val_prefix_mse"][-1], "s-", label="held-out episodes")
        how = "leave-one-out residuals" if history["leave_one_out"] else "plain residuals"
        scales = "cell scales" if history.get("cell_scale") else "no cell scales"
        a.set(title=f"residual k-means on {how}\n({history['kmeans_iters']} Lloyd iterations per stage, "
                    f"{scales}, beam {history.get('beam_width', 1)})",
              xlabel="layers", ylabel="MSE (normalized units)")
        a.legend()
        a.grid(alpha=0.3)
        _save_figure(fig, path)
        return

    epochs = history["epoch"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].semilogy(epochs, history["recon_loss"], label="recon (kept layers)")
    if any(v > 0 for v in history["prefix_loss"]):
        ax[0].semilogy(epochs, history["prefix_loss"], label="mean over prefixes")
    if any(v > 0 for v in history["commit_loss"]):
        ax[0].semilogy(epochs, history["commit_loss"], label="commitment")
    ax[0].set(title="training losses (normalized units)", xlabel="epoch")
    mse = np.array(history["val_prefix_mse"])  # [epochs, L]
    for l in range(mse.shape[1]):
        ax[1].semilogy(epochs, mse[:, l], label=f"layers 1-{l + 1}", color=plt.cm.viridis(l / max(1, mse.shape[1] - 1)))
    ax[1].axvline(history["best_epoch"], color="k", ls=":", label="best (kept)")
    ax[1].set(title="validation MSE (held-out episodes)", xlabel="epoch")
    usage = np.array(history["train_usage"])
    for l in range(usage.shape[1]):
        ax[2].plot(epochs, usage[:, l], label=f"layer {l + 1}", color=plt.cm.viridis(l / max(1, usage.shape[1] - 1)))
    ax[2].set(title="codes used per layer (share of min(K, samples), train)", xlabel="epoch", ylim=(0, 1.05))
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    _save_figure(fig, path)


def _save_figure(fig, path: str) -> None:
    """Write the figure to a temporary file, then rename: a crash never leaves half a PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(result: dict) -> None:
    m = result["metrics"]
    c = result["config"]
    how = (f"best epoch {m['best_epoch']}" if c.get("encoder", "mlp") == "mlp"
           else f"no encoder, residual k-means, {'cell scales' if c.get('cell_scale') else 'no cell scales'}, "
                f"beam {c.get('beam_width', 1)}")
    print(f"\n{c['quantizer']} tokenizer | {m['train_chunks']} train / {m['val_chunks']} "
          f"val chunks ({m['train_episodes']} / {m['val_episodes']} episodes) | {how} | "
          f"training {m['train_seconds']:.0f} s")
    print(f"{'layers':>6} {'bits':>6} {'val MSE':>10} {'gain':>6} | layer {'codes used':>10} "
          f"{'of possible':>11} {'perplexity':>10}")
    prev = None
    for l, (mse, bits, u) in enumerate(zip(m["val_prefix_mse"], m["bits_per_chunk"], m["val_usage"]), 1):
        gain = "" if prev is None else f"{100 * (prev - mse) / prev:.0f}%"
        print(f"{'1-' + str(l):>6} {bits:>6.0f} {mse:>10.6f} {gain:>6} | {l:>5} {u['used']:>10d} "
              f"{u['used_of_possible']:>11.2f} {u['perplexity']:>10.1f}")
        prev = mse


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_args(args)
    log.info("arguments: %s", vars(args))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import collect_actions

    episodes, files = load_data(args)
    train_eps, val_eps = collect_actions.split_by_episode(episodes, args.val_fraction, args.seed)
    train = collect_actions.chunk_actions(train_eps, args.chunk_size)
    val = collect_actions.chunk_actions(val_eps, args.chunk_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"episodes shorter than --chunk_size {args.chunk_size}: {len(train)} train and "
                         f"{len(val)} validation chunks")
    config = config_from_args(args, action_dim=train.shape[2])
    log.info("config: %s", asdict(config))
    log.info("%d train chunks from %d episodes, %d validation chunks from %d held-out episodes",
             len(train), len(train_eps), len(val), len(val_eps))
    t0 = time.perf_counter()
    if config.encoder == "none":
        log.info("encoder none: fitting %d stages by residual k-means (%d iterations each)",
                 config.num_layers * config.latent_steps, args.kmeans_iters)
        model, history = fit_residual_kmeans(config, train, val, iters=args.kmeans_iters,
                                             leave_one_out=not args.no_leave_one_out, device=args.device)
    else:
        model, history = train_tokenizer(config, train, val, epochs=args.epochs, batch_size=args.batch_size,
                                         lr=args.lr, device=args.device, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    final = evaluate(model, torch.as_tensor(val, device=args.device))
    metrics = {
        "val_prefix_mse": final["prefix_mse"], "val_usage": final["usage"], "val_score": final["score"],
        "bits_per_chunk": [model.bits_per_chunk(l) for l in range(1, config.num_layers + 1)],
        "best_epoch": history["best_epoch"], "train_seconds": train_seconds,
        "train_chunks": len(train), "val_chunks": len(val),
        "train_episodes": len(train_eps), "val_episodes": len(val_eps),
    }
    provenance = {
        "args": vars(args), "seed": args.seed, "metrics": metrics, "history": history,
        "data": {"files": [os.path.abspath(f) for f in files],
                 "train_episodes": [collect_actions.episode_identity(e) for e in train_eps],
                 "val_episodes": [collect_actions.episode_identity(e) for e in val_eps]},
    }
    save_tokenizer(model, args.output, provenance)
    plot = output_path(args.output, "_training_history.png")
    save_history_plot(history, plot)
    log.info("saved %s and %s", args.output, plot)
    result = {"output": args.output, "plot": plot, "config": asdict(config), "metrics": metrics}
    print_table(result)
    log.info("quick validation (normalized MSE, %d held-out episodes): %s", len(val_eps),
             " | ".join(f"L1-{l} {v:.5f}" for l, v in enumerate(final["prefix_mse"], 1)))
    if args.json:
        collect_actions.write_json(args.json, result)
        log.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    import sys

    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
