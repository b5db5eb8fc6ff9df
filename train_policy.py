"""Phase 2: train the main token policy over a frozen tokenizer's codes.

    python train_policy.py --data data/spatial_train.hdf5 --tokenizer rvq_tokenizer.pt \\
        --output policy.pt --json policy.json [--variant ar|parallel] [--num_layers 8]

The policy predicts the first ``--num_layers`` layers of the tokenizer's codes (default: all of
them); a prefix of layers decodes, so the later phases decode its codes with the same tokenizer
and read the number of layers from the policy's config. The main job's tokenizer (``--encoder
pca``, 24 layers of 16 bits) is built to beat the compression baselines deep into its layers; a
policy predicts its first 8 (128 bits; issue 27).

One multi-task policy per suite, conditioned on the instruction; low-dim observations.
Validation is on held-out episodes: per-layer token accuracy (teacher forced) and the MSE of
the actions decoded by dense greedy decoding against the demo's actions (normalized units).
The checkpoint kept is the one with the lowest validation action MSE.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cli
import policy_models as pm
from cli import arg
from demos import TARGETS, episode_identity, episode_key, load_episodes, split_by_episode
from fileio import check_outputs, file_sha256, save_figure
from policy_data import ChunkDataset, batches, build_dataset, instruction_vocab, obs_widths, one_cycle
from rvq_tokenizer import load_tokenizer

log = logging.getLogger("train_policy")

# A cross-entropy this many times that of guessing uniformly means the optimizer has diverged.
DIVERGED_LOSS_FACTOR = 10.0


@dataclass
class PolicyArgs(cli.OptimArgs):
    # data
    data: list[str] = arg(None, "demo files (HDF5, data/demo_*/...) or LeRobot dataset folders",
                          factory=list, required=True, nargs="+", metavar="PATH")
    tokenizer: str = arg(None, "phase-1 tokenizer checkpoint", required=True, metavar="PATH")
    num_layers: int | None = arg(None, "layers of the tokenizer's codes the policy predicts, its first ones "
                                       "(default: all of them; with --init: the starting policy's)")
    obs_keys: list[str] = arg(None, "low-dim observation keys, concatenated",
                              factory=lambda: list(pm.DEFAULT_OBS_KEYS), nargs="+")
    targets: str = arg("actions", "what the policy imitates: the executed actions, or the expert's own "
                                  "commands stored by a perturbed collection (collect_actions.py --perturb)",
                       choices=list(TARGETS))
    action_history: int = arg(0, "append the last N executed actions to the observation (0: observation only)")
    val_fraction: float = arg(0.1, "episodes held out for validation")
    # model
    init: str | None = arg(None, "start from this policy checkpoint (same tokenizer, instructions and "
                                 "observation layout; its architecture and observation normalization are "
                                 "kept): a DAgger round fine-tunes the previous round's policy", metavar="PATH")
    variant: str = arg("ar", "ar: layer-autoregressive (one pass per layer); parallel: every layer in one "
                             "pass (the one-pass baseline)", choices=list(pm.VARIANTS))
    d_model: int = arg(128, "transformer width")
    n_heads: int = arg(4, "attention heads")
    n_blocks: int = arg(4, "transformer blocks")
    obs_tokens: int = arg(4, "tokens the observation is embedded into")
    dropout: float = arg(0.1, "dropout")
    # optimisation
    epochs: int = arg(18, "training epochs")
    batch_size: int = arg(512, "examples per optimisation step")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    obs_noise: float = arg(0.0, "std of Gaussian noise added to normalized observations in training")
    # output
    output: str = cli.output_arg("policy.pt", "the policy checkpoint (written when training ends)")
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.check_optim()
        cli.require_counts(self, "d_model", "n_heads", "n_blocks", "obs_tokens")
        cli.require(self.num_layers is None or self.num_layers >= 1,
                    f"--num_layers must be >= 1, got {self.num_layers}")
        cli.require(self.action_history >= 0, f"--action_history must be >= 0, got {self.action_history}")
        cli.require_positive("--weight_decay", self.weight_decay, allow_zero=True)
        cli.require_positive("--obs_noise", self.obs_noise, allow_zero=True)
        cli.require(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        cli.require(0 < self.val_fraction < 1, f"--val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def history_plot(self) -> str:
        return os.path.splitext(self.output)[0] + "_history.png"

    @property
    def incomplete(self) -> str:
        """Where the best checkpoint so far is kept while training runs (marked incomplete)."""
        return self.output + ".incomplete"


@torch.no_grad()
def evaluate(model: pm.TokenPolicy, tokenizer, data: ChunkDataset, batch_size: int = 1024) -> dict:
    """Teacher-forced loss and per-layer accuracy; dense greedy decoding -> action MSE."""
    model.eval()
    L = model.config.num_layers
    correct = torch.zeros(L)
    loss_sum, sq_err, n_pos = 0.0, 0.0, 0
    for idx in batches(len(data), batch_size, shuffle=False):
        obs, task, codes = data.obs[idx], data.task[idx], data.codes[idx]
        logits = model(obs, task, codes)
        loss_sum += float(F.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="sum"))
        correct += (logits.argmax(-1) == codes).float().sum((0, 1))
        n_pos += codes.shape[0] * codes.shape[1]
        pred = tokenizer.normalize(tokenizer.decode(model.greedy_decode(obs, task)))
        sq_err += float(((pred - tokenizer.normalize(data.actions[idx])) ** 2).sum())
    return {
        "loss": loss_sum / (n_pos * L),
        "token_accuracy": (correct / n_pos).tolist(),
        "action_mse": sq_err / data.actions.numel(),
    }


def train_epoch(model, opt, sched, data: ChunkDataset, args, gen) -> float:
    model.train()
    total, n = 0.0, 0
    for idx in batches(len(data), args.batch_size, gen):
        obs, task, codes = data.obs[idx], data.task[idx], data.codes[idx]
        if args.obs_noise > 0:
            noise = torch.randn(obs.shape, generator=gen).to(obs.device)  # drawn on the CPU, where gen lives
            obs = obs + args.obs_noise * model.obs_encoder.normalizer.std * noise
        logits = model(obs, task, codes)
        loss = F.cross_entropy(logits.flatten(0, 2), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        n += len(idx)
    return total / n


def plot_history(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val"]["loss"] for h in history], label="validation")
    ax[0].set(title="cross-entropy per token", xlabel="epoch")
    ax[0].legend()
    acc = np.array([h["val"]["token_accuracy"] for h in history])
    for l in range(acc.shape[1]):
        ax[1].plot(ep, acc[:, l], label=f"layer {l + 1}")
    ax[1].set(title="validation token accuracy (teacher forced)", xlabel="epoch")
    ax[1].legend(fontsize=7, ncol=2)
    ax[2].semilogy(ep, [h["val"]["action_mse"] for h in history])
    ax[2].set(title="validation action MSE (dense greedy, normalized)", xlabel="epoch")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def keep_init_split(train_eps: list, val_eps: list, init_provenance: dict) -> tuple[list, list]:
    """Episodes the starting policy trained on stay in training, those it was validated on stay
    in validation (new episodes keep their side), so the validation set holds nothing either
    policy has learnt from."""
    seen = {episode_key(e) for e in init_provenance["data"]["train_episodes"]}
    held = {episode_key(e) for e in init_provenance["data"]["val_episodes"]}
    drawn_val = {id(e) for e in val_eps}

    def is_val(e) -> bool:
        k = episode_key(e)
        return k in held or (k not in seen and id(e) in drawn_val)

    every = train_eps + val_eps
    return [e for e in every if not is_val(e)], [e for e in every if is_val(e)]


def load_data(args, tokenizer, init_ckpt: dict | None = None, num_layers: int | None = None):
    """Split by episode and build both datasets, the codes' first ``num_layers`` layers (None:
    all). With ``init_ckpt`` (the policy to start from),
    its vocabulary of instructions is kept (every instruction in the data must be in it) and so
    is its split of the episodes it has seen (``keep_init_split``)."""
    D = tokenizer.config.action_dim
    episodes = load_episodes(args.data, action_dim=D)
    if not episodes:
        raise ValueError(f"no successful episodes in {args.data}")
    short = [e for e in episodes if len(e) < tokenizer.config.chunk_size]
    if short:
        log.warning("%d episode(s) shorter than a chunk (%d steps) give no training chunk and are left out, "
                    "e.g. %s:%s (%d steps)", len(short), tokenizer.config.chunk_size, short[0].source,
                    short[0].key, len(short[0]))
        episodes = [e for e in episodes if len(e) >= tokenizer.config.chunk_size]
    train_eps, val_eps = split_by_episode(episodes, args.val_fraction, args.seed)
    if init_ckpt is None:
        instructions = instruction_vocab(episodes)
    else:
        train_eps, val_eps = keep_init_split(train_eps, val_eps, init_ckpt["provenance"])
        if not val_eps:
            raise ValueError(f"no validation episode left in {args.data}: --init {args.init!r} trained "
                             "on all of them (add its data files or more new episodes)")
        instructions = tuple(init_ckpt["config"]["instructions"])
        unknown = sorted(set(instruction_vocab(episodes)) - set(instructions))
        if unknown:
            raise ValueError(f"--init {args.init!r} was trained without the instruction(s) {unknown} "
                             f"found in {args.data}")
    # scenes with fewer objects or fixtures are zero-padded to the widest (libero_10's tasks play in 9 scenes)
    widths = tuple(init_ckpt["config"].get("obs_widths", ())) if init_ckpt else obs_widths(episodes, args.obs_keys)
    kw = dict(targets=args.targets, history=args.action_history, num_layers=num_layers, widths=widths)
    train = build_dataset(train_eps, tokenizer, args.obs_keys, instructions, **kw)
    val = build_dataset(val_eps, tokenizer, args.obs_keys, instructions, **kw)
    log.info("%d train episodes (%d chunks), %d validation episodes (%d chunks), %d instructions",
             len(train_eps), len(train), len(val_eps), len(val), len(instructions))
    return train_eps, val_eps, train, val, instructions, widths


def load_init(args) -> tuple[pm.TokenPolicy, dict]:
    """The policy to start from: it must use this tokenizer, these observation keys, this
    action history and this variant (flags that would silently change its inputs)."""
    model, ckpt = pm.load_policy(args.init, args.tokenizer)
    cfg = model.config
    for flag, want, got in (("--obs_keys", tuple(args.obs_keys), tuple(cfg.obs_keys)),
                            ("--action_history", args.action_history, cfg.action_history),
                            ("--variant", args.variant, cfg.variant),
                            ("--num_layers", args.num_layers or cfg.num_layers, cfg.num_layers)):
        if want != got:
            raise ValueError(f"--init {args.init!r} was trained with {flag} {got}, not {want}")
    return model, ckpt


def check_finite_metrics(epoch: int, train_loss: float, metrics: dict, vocab: int) -> None:
    """Stop a diverged run: a loss or validation metric that is not finite, or a training loss
    far above that of guessing uniformly among ``vocab`` codes."""
    values = [train_loss, metrics["loss"], metrics["action_mse"]]
    if not all(math.isfinite(v) for v in values) or train_loss > DIVERGED_LOSS_FACTOR * math.log(vocab):
        raise ValueError(f"training diverged at epoch {epoch} (training loss {train_loss:.4g}, validation "
                         f"action MSE {metrics['action_mse']:.4g}); lower --lr. Nothing was written to the "
                         "output; the best earlier epoch, if any, is in the .incomplete checkpoint")


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(PolicyArgs, "Train the main token policy over a frozen tokenizer's codes (phase 2).")

def main(args: PolicyArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--output": args.output, "--json": args.json, "history plot": args.history_plot},
                  {"--data": args.data, "--tokenizer": args.tokenizer, "--init": args.init})
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer, _ = load_tokenizer(args.tokenizer)
    tc = tokenizer.config
    if tc.encoder == "none":
        raise ValueError(f"--tokenizer {args.tokenizer}: encoder 'none' is for compression studies (the T' codes "
                         f"of its whole-chunk layers are sequential stages); the policy needs a tokenizer whose "
                         f"T' codes of a layer are parallel: encoder 'pca' (train_rvq_tokenizer.py's default) or 'mlp'")
    if args.num_layers is not None and args.num_layers > tc.num_layers:
        raise ValueError(f"--num_layers {args.num_layers}: the tokenizer {args.tokenizer} has {tc.num_layers} layers")
    tok_sha = file_sha256(args.tokenizer)
    init, init_ckpt = load_init(args) if args.init else (None, None)
    num_layers = init.config.num_layers if init is not None else args.num_layers or tc.num_layers
    init_info = None
    train_eps, val_eps, train, val, instructions, widths = load_data(args, tokenizer, init_ckpt, num_layers)
    if init is not None:
        if train.obs.shape[1] != init.config.obs_dim:
            raise ValueError(f"--init {args.init!r} takes {init.config.obs_dim} observation features, "
                             f"the data gives {train.obs.shape[1]}")
        model = init.train()  # architecture and observation normalization from the checkpoint
        init_info = {"path": os.path.abspath(args.init), "sha256": file_sha256(args.init)}
        log.info("starting from %s (%s)", args.init, init_info["sha256"][:12])
    else:
        cfg = pm.PolicyConfig(
            obs_dim=train.obs.shape[1], instructions=instructions, latent_steps=tc.latent_steps,
            num_layers=num_layers, codebook_sizes=tokenizer.layer_codebook_sizes()[:num_layers],
            obs_keys=tuple(args.obs_keys), obs_widths=widths, action_history=args.action_history, variant=args.variant,
            d_model=args.d_model, n_heads=args.n_heads, n_blocks=args.n_blocks, obs_tokens=args.obs_tokens,
            dropout=args.dropout)
        model = pm.TokenPolicy(cfg)
        model.obs_encoder.normalizer.fit(train.obs.numpy())
    model, tokenizer = model.to(args.device), tokenizer.to(args.device)
    train, val = train.to(args.device), val.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("policy %s: %.2fM parameters", args.variant, n_params / 1e6)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    sched = one_cycle(opt, args.lr, steps)
    gen = torch.Generator().manual_seed(args.seed)
    history, best = [], None
    provenance = {
        "args": cli.settings_dict(args), "seed": args.seed, "tokenizer": os.path.abspath(args.tokenizer),
        "init": init_info, "complete": False,
        "data": {"files": [os.path.abspath(p) for p in args.data],
                 "train_episodes": [episode_identity(e) for e in train_eps],
                 "val_episodes": [episode_identity(e) for e in val_eps]},
    }
    t0 = time.perf_counter()
    bar = cli.progress(range(1, args.epochs + 1), desc=f"train {args.variant} policy", unit="epoch")
    for epoch in bar:
        train_loss = train_epoch(model, opt, sched, train, args, gen)
        metrics = evaluate(model, tokenizer, val)
        check_finite_metrics(epoch, train_loss, metrics, model.config.vocab)
        history.append({"epoch": epoch, "train_loss": train_loss, "val": metrics})
        log.info("epoch %d/%d: loss %.4f, validation action MSE %.5f, layer-1 accuracy %.3f", epoch,
                 args.epochs, train_loss, metrics["action_mse"], metrics["token_accuracy"][0])
        if best is None or metrics["action_mse"] < best["val"]["action_mse"]:
            best = history[-1]
            provenance["metrics"] = {"best_epoch": epoch, **metrics}
            # the best so far, beside the output (never over it) until training ends
            pm.save_policy(model, args.incomplete, tok_sha, provenance)
    wall = time.perf_counter() - t0
    final, ckpt = pm.load_policy(args.incomplete)  # the best epoch's weights
    provenance["complete"] = True
    pm.save_policy(final, args.output, tok_sha, provenance)
    os.remove(args.incomplete)
    plot_history(history, args.history_plot)

    result = {
        "variant": args.variant,
        "val_token_accuracy": best["val"]["token_accuracy"],
        "val_action_mse": best["val"]["action_mse"],
        "val_loss": best["val"]["loss"],
        "best_epoch": best["epoch"],
        "train_seconds": wall,
        "parameters": n_params,
        "train_chunks": len(train), "val_chunks": len(val),
        "train_episodes": len(train_eps), "val_episodes": len(val_eps),
        "history": history,
        "output": args.output,
    }
    print(f"\n{args.variant} policy: best epoch {best['epoch']} of {args.epochs}, "
          f"{wall / 60:.1f} min, checkpoint {args.output}")
    print("validation token accuracy per layer: "
          + " ".join(f"L{l + 1} {a:.3f}" for l, a in enumerate(result["val_token_accuracy"])))
    print(f"validation action MSE (dense greedy, normalized units): {result['val_action_mse']:.5f}")
    cli.save_json(args.json, result, log)
    return result



if __name__ == "__main__":
    cli.run(main, build_parser())
