"""Phase 1: train a residual tokenizer on LIBERO action chunks.

    python train_rvq_tokenizer.py --num_episodes 50                   # collect with the scripted expert, then fit
    python train_rvq_tokenizer.py --data demos.hdf5                    # fit on existing demo files
    python train_rvq_tokenizer.py --data demos.hdf5 --encoder mlp      # an MLP autoencoder with RVQ, trained
    python train_rvq_tokenizer.py --data demos.hdf5 --encoder mlp --quantizer rfsq
    python train_rvq_tokenizer.py --data demos.hdf5 --encoder none     # RVQ on the chunk itself, residual k-means

The default tokenizer (``--encoder pca``, 2 positions, 24 layers of 256 codes, a beam of 8) is the
one the whole chain uses (issue 27): RVQ in the chunk's principal axes, the positions of a layer
coded in parallel with one shared codebook, fit by residual k-means; it is below DCT, FAST and
binning at every bit budget up to DCT's 0.001 on held-out episodes, and a policy predicts its
first layers (``train_policy.py --num_layers``). Chunks are cut from whole episodes and the
validation split is made by episode, so no validation chunk overlaps a training chunk.

``--encoder pca`` and ``--encoder none`` have nothing to train by gradient: the codebooks (and
each code's residual scale, unless ``--no_cell_scale``) are fit stage by stage by k-means on the
training chunks' leave-one-out residuals, and the plot shows train and validation MSE per layer.
``--encoder mlp`` trains by gradient and keeps the epoch with the best validation error
(geometric mean over prefixes 1..L of the normalized-action MSE). The checkpoint records the data
files, the train / validation episodes, the arguments, the seed and the metrics. Beside it:
``<stem>_training_history.png`` and, when collecting, ``<stem>_demos.hdf5``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import cli
from cli import arg
from demos import TARGETS, chunk_actions, episode_identity, episode_targets, load_episodes, split_by_episode, validation_count
from fileio import check_outputs, save_figure
from rvq_tokenizer import (DEFAULT_BEAM_WIDTH, DIRECT_KMEANS_ITERS, ENCODERS, KMEANS_ENCODERS, QUANTIZERS, RVQConfig,
                           code_usage, fit_residual_kmeans, save_tokenizer, train_tokenizer, validation_metrics)

log = logging.getLogger("train_rvq_tokenizer")

# Encoder / decoder width per quantizer: RFSQ over-fits the main job's 50 episodes at 64.
DEFAULT_HIDDEN_DIM = {"rvq": 64, "rfsq": 32}
# Latent steps T' and layers L per encoder when the flags are not given. "pca": the main job's
# tokenizer, chosen in issue 27 (16-bit layers pass bar 1 where coarser ones lose at the low-bit
# end, and 24 of them reach past DCT's 0.001; the beam's 8 paths are RVQConfig's default for it).
# "mlp" and "none": the sizes they were studied with (RVQConfig's defaults).
ENCODER_DEFAULTS = {"pca": {"latent_steps": 2, "num_layers": 24},
                    "mlp": {"latent_steps": RVQConfig.latent_steps, "num_layers": RVQConfig.num_layers},
                    "none": {"latent_steps": RVQConfig.latent_steps, "num_layers": RVQConfig.num_layers}}


@dataclass
class TokenizerArgs(cli.OptimArgs):
    # data
    data: list[str] | None = arg(None, "demo files (data/demo_*/actions) or LeRobot dataset folders to train "
                                       "on; without it, collect with the scripted expert first", nargs="+",
                                 metavar="PATH")
    task_suite: str = arg("libero_spatial", "suite to collect from (without --data)")
    task_id: int = arg(0, "task to collect (without --data)")
    num_episodes: int = arg(50, "episodes to collect (without --data)")
    workers: int = arg(min(2, os.cpu_count() or 1), "collection processes (without --data); the episodes do not "
                                                    "depend on it")
    chunk_size: int = arg(10, "steps per action chunk")
    targets: str = arg("actions", "train on the executed actions, or on the expert's own commands stored by a "
                                  "perturbed collection (collect_actions.py --perturb)", choices=list(TARGETS))
    val_fraction: float = arg(0.1, "share of episodes held out (at least one)")
    # model
    quantizer: str = arg("rvq", "residual VQ, or residual finite scalar quantization", choices=list(QUANTIZERS))
    encoder: str = arg("pca", "'pca': RVQ in the chunk's principal axes, dealt out to latent_steps parallel "
                              "positions sharing one codebook per layer; 'none': RVQ on the normalized chunk itself "
                              "(whole-chunk layers, then step-group layers; see --chunk_layers); both fit by "
                              "residual k-means (no gradient training: the training flags are ignored); 'mlp': an "
                              "MLP encoder and decoder trained by gradient with --quantizer",
                       choices=list(ENCODERS))
    chunk_layers: int = arg(RVQConfig.chunk_layers, "encoder 'none': the first layers code the whole chunk "
                                                    "(latent_steps stages each), the rest code latent_steps "
                                                    "groups of steps with one shared codebook")
    no_leave_one_out: bool = arg(False, "encoders 'pca' and 'none': fit each stage on the plain training "
                                        "residuals, which the stages memorise, instead of the leave-one-out ones")
    no_cell_scale: bool = arg(False, "encoders 'pca' and 'none': no per-code residual scales")
    beam_width: int | None = arg(None, "encoders 'pca' and 'none': paths kept by the beam search that encodes (1: "
                                       "the nearest code at every stage; default "
                                       + ", ".join(f"{w} for {e}" for e, w in DEFAULT_BEAM_WIDTH.items()) + ")")
    kmeans_iters: int = arg(DIRECT_KMEANS_ITERS, "Lloyd iterations per codebook (encoders 'pca' and 'none')")
    num_layers: int | None = arg(None, "residual layers (default: "
                                       + ", ".join(f"{d['num_layers']} for {e}" for e, d in ENCODER_DEFAULTS.items())
                                       + ")")
    codebook_size: int = arg(256, "K per RVQ layer")
    fsq_levels: list[int] = arg(None, "RFSQ levels per latent dimension (codebook = their product)",
                                factory=lambda: list(RVQConfig.fsq_levels), nargs="+")
    fsq_layer_scale: float = arg(RVQConfig.fsq_layer_scale, "RFSQ: residual magnification per layer, in "
                                                            "(1, min level]; 0 = the levels (an exactly nested grid)")
    latent_steps: int | None = arg(None, "latent vectors (positions) per chunk; one layer costs latent_steps * "
                                         "log2(K) bits (default: "
                                         + ", ".join(f"{d['latent_steps']} for {e}" for e, d in ENCODER_DEFAULTS.items())
                                         + ")")
    hidden_dim: int | None = arg(None, f"encoder / decoder width (default: {DEFAULT_HIDDEN_DIM['rvq']} for rvq, "
                                       f"{DEFAULT_HIDDEN_DIM['rfsq']} for rfsq)")
    code_dim: int = arg(RVQConfig.code_dim, "RVQ code vector size")
    residual_dropout: float = arg(0.1, "probability that a sample is cut after a random number of layers")
    prefix_loss_weight: float = arg(RVQConfig.prefix_loss_weight, "weight of the mean loss over prefixes")
    commitment_weight: float = arg(RVQConfig.commitment_weight, "weight of the commitment loss")
    # training
    epochs: int = arg(100, "training epochs")
    batch_size: int = arg(32, "examples per optimisation step")
    lr: float = arg(1e-3, "peak learning rate (warm-up, then cosine)")
    threads: int = arg(1, "CPU threads for torch; the matrices are tiny, more threads mostly add contention")
    # output
    output: str = cli.output_arg("rvq_tokenizer.pt", "the tokenizer checkpoint")
    json: str | None = cli.json_arg()
    no_progress: bool = arg(False, "no progress bars")

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = DEFAULT_HIDDEN_DIM.get(self.quantizer, 64)
        for name, value in ENCODER_DEFAULTS.get(self.encoder, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.check_optim()
        cli.require_counts(self, "kmeans_iters", "chunk_size", "workers")
        cli.require(0 < self.val_fraction < 1, f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        self.config(action_dim=1)  # model flags fail here, before any data is read
        if self.data is None:
            cli.require(self.num_episodes >= 2, f"--num_episodes must be >= 2 to hold out episodes, got "
                                                f"{self.num_episodes}")
            cli.require(validation_count(self.num_episodes, self.val_fraction) < self.num_episodes,
                        f"--num_episodes {self.num_episodes} with --val_fraction {self.val_fraction} leaves no "
                        "training episode")

    def config(self, action_dim: int) -> RVQConfig:
        return RVQConfig(
            action_dim=action_dim, chunk_size=self.chunk_size, latent_steps=self.latent_steps,
            hidden_dim=self.hidden_dim, code_dim=self.code_dim, quantizer=self.quantizer, encoder=self.encoder,
            chunk_layers=self.chunk_layers, cell_scale=False if self.no_cell_scale else None,
            beam_width=self.beam_width, num_layers=self.num_layers, codebook_size=self.codebook_size,
            fsq_levels=tuple(self.fsq_levels), fsq_layer_scale=self.fsq_layer_scale or None,
            residual_dropout=self.residual_dropout, prefix_loss_weight=self.prefix_loss_weight,
            commitment_weight=self.commitment_weight)

    @property
    def demos_output(self) -> str:
        """Where the collected demos go without --data: beside the checkpoint."""
        return output_path(self.output, "_demos.hdf5")

    @property
    def plot(self) -> str:
        return output_path(self.output, "_training_history.png")


def parse_args(argv=None) -> TokenizerArgs:
    return build_parser().parse_args(argv)


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(TokenizerArgs, "Fit or train a residual tokenizer on LIBERO action chunks "
                                         "(phase 1); without --data, collect with the scripted expert first.")


def output_path(output: str, suffix: str) -> str:
    """A file beside the checkpoint: rvq_tokenizer.pt -> rvq_tokenizer<suffix>."""
    return os.path.splitext(output)[0] + suffix


# --------------------------------------------------------------------------- data and outputs


def load_data(args: TokenizerArgs) -> tuple[list, list[str]]:
    """Episodes to train on and the demo files they came from; collects first without --data
    (into ``<output stem>_demos.hdf5``; a file already there is reused, not overwritten)."""
    import collect_actions

    files, _ = collect_actions.demos_or_collect(
        args.data, args.demos_output, task_suite=args.task_suite, task_id=[args.task_id],
        num_episodes=args.num_episodes, seed=args.seed, workers=args.workers, no_progress=args.no_progress)
    episodes = load_episodes(files)
    if not episodes:
        raise ValueError(f"no successful episodes in {', '.join(files)}")
    episodes = [replace(e, actions=episode_targets(e, args.targets)) for e in episodes]
    short = [e for e in episodes if len(e) < args.chunk_size]
    if short:
        log.warning("%d episode(s) shorter than --chunk_size %d give no chunk and are left out, e.g. %s:%s "
                    "(%d steps)", len(short), args.chunk_size, short[0].source, short[0].key, len(short[0]))
        episodes = [e for e in episodes if len(e) >= args.chunk_size]
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
    import matplotlib.pyplot as plt

    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def print_table(result: dict) -> None:
    m = result["metrics"]
    c = result["config"]
    encoder = c.get("encoder", "mlp")
    how = (f"best epoch {m['best_epoch']}" if encoder == "mlp"
           else f"{'principal axes' if encoder == 'pca' else 'no encoder'}, residual k-means, "
                f"{'cell scales' if c.get('cell_scale') else 'no cell scales'}, beam {c.get('beam_width', 1)}")
    print(f"\n{c['quantizer']} tokenizer ({encoder}) | {m['train_chunks']} train / {m['val_chunks']} "
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


def main(args: TokenizerArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--output": args.output, "--json": args.json, "history plot": args.plot,
                   "collected demos": None if args.data else args.demos_output},
                  {"--data": args.data})
    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    episodes, files = load_data(args)
    train_eps, val_eps = split_by_episode(episodes, args.val_fraction, args.seed)
    train = chunk_actions(train_eps, args.chunk_size)
    val = chunk_actions(val_eps, args.chunk_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"episodes shorter than --chunk_size {args.chunk_size}: {len(train)} train and "
                         f"{len(val)} validation chunks")
    config = args.config(action_dim=train.shape[2])
    log.info("%d train chunks from %d episodes, %d validation chunks from %d held-out episodes",
             len(train), len(train_eps), len(val), len(val_eps))
    t0 = time.perf_counter()
    if config.encoder in KMEANS_ENCODERS:
        log.info("encoder %s: fitting %d layers by residual k-means (%d Lloyd iterations per codebook)",
                 config.encoder, config.num_layers, args.kmeans_iters)
        model, history = fit_residual_kmeans(config, train, val, iters=args.kmeans_iters,
                                             leave_one_out=not args.no_leave_one_out, device=device)
    else:
        model, history = train_tokenizer(config, train, val, epochs=args.epochs, batch_size=args.batch_size,
                                         lr=args.lr, device=device, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    final = validation_metrics(model, torch.as_tensor(val, device=device))
    if not all(np.isfinite(final["prefix_mse"])):
        raise ValueError(f"the fitted tokenizer's validation MSE is not finite ({final['prefix_mse']}): check the "
                         "actions for extreme values")
    metrics = {
        "val_prefix_mse": final["prefix_mse"], "val_usage": final["usage"], "val_score": final["score"],
        "bits_per_chunk": [model.bits_per_chunk(l) for l in range(1, config.num_layers + 1)],
        "best_epoch": history["best_epoch"], "train_seconds": train_seconds,
        "train_chunks": len(train), "val_chunks": len(val),
        "train_episodes": len(train_eps), "val_episodes": len(val_eps),
    }
    provenance = {
        "args": cli.settings_dict(args), "seed": args.seed, "metrics": metrics, "history": history,
        "data": {"files": [os.path.abspath(f) for f in files],
                 "train_episodes": [episode_identity(e) for e in train_eps],
                 "val_episodes": [episode_identity(e) for e in val_eps]},
    }
    save_tokenizer(model.cpu(), args.output, provenance)
    save_history_plot(history, args.plot)
    log.info("saved %s and %s", args.output, args.plot)
    result = {"output": args.output, "plot": args.plot, "config": asdict(config), "metrics": metrics}
    print_table(result)
    cli.save_json(args.json, result, log)
    return result


if __name__ == "__main__":
    cli.run(main, build_parser())
