"""Phase 2: train the main token policy over a frozen tokenizer's codes.

    python train_policy.py --data data/spatial_train.hdf5 --tokenizer rvq_tokenizer.pt \\
        --output policy.pt --json policy.json [--variant ar|parallel]

One multi-task policy per suite, conditioned on the instruction; low-dim observations.
Validation is on held-out episodes: per-layer token accuracy (teacher forced) and the MSE of
the actions decoded by dense greedy decoding against the demo's actions (normalized units).
The checkpoint kept is the one with the lowest validation action MSE.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import collect_actions as ca
import policy_models as pm
from policy_data import ChunkDataset, batches, build_dataset, instruction_vocab
from rvq_tokenizer import load_tokenizer

log = logging.getLogger("train_policy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the main token policy (phase 2).")
    # data
    p.add_argument("--data", nargs="+", required=True, help="demo files (HDF5, data/demo_*/...)")
    p.add_argument("--tokenizer", required=True, help="phase-1 tokenizer checkpoint")
    p.add_argument("--obs_keys", nargs="+", default=list(pm.DEFAULT_OBS_KEYS))
    p.add_argument("--targets", choices=ca.TARGETS, default="actions",
                   help="what the policy imitates: the executed actions, or the expert's own commands "
                        "stored by a perturbed collection (collect_actions.py --perturb)")
    p.add_argument("--action_history", type=int, default=0,
                   help="append the last N executed actions to the observation (0: observation only)")
    p.add_argument("--val_fraction", type=float, default=0.1)
    # model
    p.add_argument("--init", default=None,
                   help="start from this policy checkpoint (same tokenizer, instructions and observation "
                        "layout; its architecture and observation normalization are kept): a DAgger round "
                        "can fine-tune the previous round's policy on the aggregated data in fewer epochs")
    p.add_argument("--variant", choices=pm.VARIANTS, default="ar")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_blocks", type=int, default=4)
    p.add_argument("--obs_tokens", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    # optimisation
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--obs_noise", type=float, default=0.0,
                   help="std of Gaussian noise added to normalized observations in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    # output
    p.add_argument("--output", default="policy.pt")
    p.add_argument("--json", default=None)
    return p


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
            obs = obs + args.obs_noise * model.obs_encoder.normalizer.std * torch.randn(obs.shape, generator=gen)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def keep_init_split(train_eps: list, val_eps: list, init_provenance: dict) -> tuple[list, list]:
    """Episodes the starting policy trained on stay in training, those it was validated on stay
    in validation (new episodes keep their side), so the validation set holds nothing either
    policy has learnt from."""
    seen = {ca.episode_key(e) for e in init_provenance["data"]["train_episodes"]}
    held = {ca.episode_key(e) for e in init_provenance["data"]["val_episodes"]}
    drawn_val = {id(e) for e in val_eps}

    def is_val(e) -> bool:
        k = ca.episode_key(e)
        return k in held or (k not in seen and id(e) in drawn_val)

    every = train_eps + val_eps
    return [e for e in every if not is_val(e)], [e for e in every if is_val(e)]


def load_data(args, tokenizer, init_ckpt: dict | None = None):
    """Split by episode and build both datasets. With ``init_ckpt`` (the policy to start from),
    its vocabulary of instructions is kept (every instruction in the data must be in it) and so
    is its split of the episodes it has seen (``keep_init_split``)."""
    D = tokenizer.config.action_dim
    episodes = ca.load_episodes(args.data, action_dim=D)
    if not episodes:
        raise ValueError(f"no successful episodes in {args.data}")
    train_eps, val_eps = ca.split_by_episode(episodes, args.val_fraction, args.seed)
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
    kw = dict(targets=args.targets, history=args.action_history)
    train = build_dataset(train_eps, tokenizer, args.obs_keys, instructions, **kw)
    val = build_dataset(val_eps, tokenizer, args.obs_keys, instructions, **kw)
    log.info("%d train episodes (%d chunks), %d validation episodes (%d chunks), %d instructions",
             len(train_eps), len(train), len(val_eps), len(val), len(instructions))
    return train_eps, val_eps, train, val, instructions


def load_init(args) -> tuple[pm.TokenPolicy, dict]:
    """The policy to start from: it must use this tokenizer, these observation keys, this
    action history and this variant (flags that would silently change its inputs)."""
    if os.path.abspath(args.init) == os.path.abspath(args.output):
        raise ValueError(f"--output {args.output!r} would overwrite --init: write the new policy elsewhere")
    model, ckpt = pm.load_policy(args.init, args.tokenizer)
    cfg = model.config
    for flag, want, got in (("--obs_keys", tuple(args.obs_keys), tuple(cfg.obs_keys)),
                            ("--action_history", args.action_history, cfg.action_history),
                            ("--variant", args.variant, cfg.variant)):
        if want != got:
            raise ValueError(f"--init {args.init!r} was trained with {flag} {got}, not {want}")
    return model, ckpt


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.info("config: %s", vars(args))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.action_history < 0:
        raise ValueError(f"--action_history must be >= 0, got {args.action_history}")
    tokenizer, _ = load_tokenizer(args.tokenizer)
    if tokenizer.config.encoder != "mlp":
        raise ValueError(f"--tokenizer {args.tokenizer}: encoder {tokenizer.config.encoder!r} is for "
                         f"compression studies; the policy and the decoding engine need a tokenizer "
                         f"with an encoder (train_rvq_tokenizer.py without --encoder none)")
    tok_sha = pm.file_sha256(args.tokenizer)
    init, init_ckpt = load_init(args) if args.init else (None, None)
    init_info = None
    train_eps, val_eps, train, val, instructions = load_data(args, tokenizer, init_ckpt)
    if init is not None:
        if train.obs.shape[1] != init.config.obs_dim:
            raise ValueError(f"--init {args.init!r} takes {init.config.obs_dim} observation features, "
                             f"the data gives {train.obs.shape[1]}")
        model = init.train()  # architecture and observation normalization from the checkpoint
        init_info = {"path": os.path.abspath(args.init), "sha256": pm.file_sha256(args.init)}
        log.info("starting from %s (%s)", args.init, init_info["sha256"][:12])
    else:
        tc = tokenizer.config
        cfg = pm.PolicyConfig(
            obs_dim=train.obs.shape[1], instructions=instructions, latent_steps=tc.latent_steps,
            num_layers=tc.num_layers, codebook_sizes=tokenizer.layer_codebook_sizes(),
            obs_keys=tuple(args.obs_keys), action_history=args.action_history, variant=args.variant,
            d_model=args.d_model, n_heads=args.n_heads, n_blocks=args.n_blocks, obs_tokens=args.obs_tokens,
            dropout=args.dropout)
        model = pm.TokenPolicy(cfg)
        model.obs_encoder.normalizer.fit(train.obs.numpy())
    n_params = sum(p.numel() for p in model.parameters())
    log.info("policy %s: %.2fM parameters", args.variant, n_params / 1e6)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    history, best = [], None
    provenance = {
        "args": vars(args), "seed": args.seed, "tokenizer": os.path.abspath(args.tokenizer),
        "init": init_info,
        "data": {"files": [os.path.abspath(p) for p in args.data],
                 "train_episodes": [ca.episode_identity(e) for e in train_eps],
                 "val_episodes": [ca.episode_identity(e) for e in val_eps]},
    }
    t0 = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=f"train {args.variant} policy", unit="epoch")
    for epoch in bar:
        train_loss = train_epoch(model, opt, sched, train, args, gen)
        metrics = evaluate(model, tokenizer, val)
        history.append({"epoch": epoch, "train_loss": train_loss, "val": metrics})
        bar.set_postfix(loss=f"{train_loss:.3f}", val_mse=f"{metrics['action_mse']:.4f}",
                        acc1=f"{metrics['token_accuracy'][0]:.3f}")
        if best is None or metrics["action_mse"] < best["val"]["action_mse"]:
            best = history[-1]
            provenance["metrics"] = {"best_epoch": epoch, **metrics}
            pm.save_policy(model, args.output, tok_sha, provenance)
    wall = time.perf_counter() - t0
    stem = os.path.splitext(args.output)[0]
    plot_history(history, stem + "_history.png")

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
    if args.json:
        ca.write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (ValueError, FileNotFoundError, KeyError) as exc:
        sys.exit(f"error: {exc}")
