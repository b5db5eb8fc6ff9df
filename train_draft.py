"""Phase 2: train the draft model that proposes the first k code layers cheaply.

    python train_draft.py --policy policy.pt --data data/spatial_train.hdf5 \\
        --output draft.pt --json draft.json [--k 3] [--source embedding|obs|both] [--chained]

The draft is distilled from the main policy: its targets are the main policy's own dense
greedy codes (what exact speculative acceptance compares against), mixed with the ground-truth
codes. It reads either the main policy's observation embedding (before the transformer, so it
costs nothing extra) through a trained projection (``embedding``), or the normalized raw
observation and a task embedding (``obs``); ``both`` trains the two and keeps the one with the
higher validation agreement (summed over layers; plus the held-out rollouts' with
``--rollouts``). It uses the main policy's own train / validation episodes.

By default the k layers come out of one pass, each on its own. ``--chained`` gives each layer
a small step of its own that also reads the codes of the layers below it (``DraftModel``): a
layer's codes depend on the codes chosen below it, and exact acceptance only reaches layer l
when the layers below were accepted, i.e. equal the main policy's codes, which is what the
chained draft is trained to read.

``--rollouts FILE...`` adds the states the main policy itself visits in closed loop (its
rollouts on training init states, recorded by ``collect_actions.py --policy token
--init_states train``). Demos only show the expert's states; in closed loop the main policy drifts off them,
and a draft distilled on demos alone agrees with it less there. Rollout chunks have no ground
truth, so only the main policy's codes are their targets; 10% of the rollout episodes are held
out and reported as ``rollout_agreement``.

Reports per-layer agreement with the main policy's argmax on validation episodes (per latent
position, and per whole layer of a chunk, which is what exact acceptance needs) and the cost
of a draft pass against a main pass (median wall time at batch 1, the two timed in turn in
the same run, and FLOPs).

``--heads J`` trains self-drafting heads instead (``policy_models.DraftHeads``, the modes
``heads`` and ``heads+adaptive``): from the final hidden state of the block that predicts layer
l and layer l's codes, head j proposes layer l + j, j = 1..J. The policy stays frozen; the
targets are its own dense greedy codes, and its hidden states are those of teacher forcing with
those codes, i.e. what the engine's verified blocks hold (self-distillation), on the same demos
and ``--rollouts``. Only the layers a pass can verify are targets (up to L - 2: a block of layer
L - 1 carries layer L - 2's code). Reported per offset j on validation episodes: agreement per
position and per whole layer, that of always proposing the training targets' most frequent code
(the chance level), and the expected number of proposals accepted per pass (the leading run of
whole layers that agree; ``--k``, ``--source``, ``--chained`` and ``--gt_weight`` do not apply).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cli
import policy_models as pm
from cli import arg
from demos import episode_key, load_episodes, split_by_episode
from fileio import check_outputs, file_sha256
from policy_data import ChunkDataset, batches, build_dataset, one_cycle, optimizer_step, training_rollouts
from rvq_tokenizer import load_tokenizer
from timing import interleaved_median_seconds

log = logging.getLogger("train_draft")


@dataclass
class DraftArgs(cli.OptimArgs):
    policy: str = arg(None, "main policy checkpoint (variant ar)", required=True, metavar="PATH")
    data: list[str] | None = arg(None, "demo files (default: the files the policy was trained on)",
                                 nargs="+", metavar="PATH")
    tokenizer: str | None = arg(None, "tokenizer checkpoint (default: the one recorded in the policy, "
                                      "hash-checked)", metavar="PATH")
    rollouts: list[str] | None = arg(None, "the main policy's own rollouts on training init states "
                                           "(collect_actions.py --policy token --init_states train): more "
                                           "states to distill on", nargs="+", metavar="FILE")
    k: int = arg(3, "layers the draft proposes")
    source: str = arg("both", "what the draft reads: the main policy's observation embedding, the raw "
                              "observation, or both (keep the one that agrees more)",
                      choices=["embedding", "obs", "both"])
    hidden: int = arg(256, "hidden width")
    depth: int = arg(2, "hidden layers")
    rank: int = arg(32, "size of the factorized output head's vectors (one-pass draft)")
    chained: bool = arg(False, "one small step per layer, each reading the codes of the layers below "
                               "(trained on the main policy's codes, fed its own proposals by the engine)")
    step_hidden: int | None = arg(None, "width of the chained draft's per-layer step (default: --hidden); "
                                        "narrower steps cost less to read at batch 1")
    gt_weight: float = arg(0.2, "weight of the ground-truth codes next to the main policy's (weight 1)")
    heads: int | None = arg(None, "instead of a draft: self-drafting heads on the frozen main policy proposing J "
                                  "layers ahead of every pass (modes heads, heads+adaptive), distilled from its "
                                  "own greedy codes", metavar="J")
    heads_hidden: int = arg(64, "--heads: width of each head's residual MLP")
    output: str = cli.output_arg("draft.pt", "the draft checkpoint")
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.check_optim()
        cli.require_counts(self, "k", "hidden", "depth", "rank")
        cli.require_positive("--gt_weight", self.gt_weight, allow_zero=True)
        cli.require(self.heads is None or self.heads >= 1, f"--heads must be >= 1 layers ahead, got {self.heads}")
        cli.require(self.heads_hidden >= 1, f"--heads_hidden must be >= 1, got {self.heads_hidden}")
        cli.require(self.heads is None or not self.chained, "--heads trains self-drafting heads, not a draft: "
                                                            "--chained does not apply")
        cli.require(self.step_hidden is None or (self.chained and self.step_hidden >= 1),
                    f"--step_hidden {self.step_hidden}: the width of a chained draft's steps, a positive "
                    "integer with --chained")


def split_like_policy(episodes, policy_ckpt) -> tuple[list, list]:
    """The policy's validation episodes stay validation episodes for the draft."""
    val_ids = {episode_key(e) for e in policy_ckpt["provenance"]["data"]["val_episodes"]}
    val = [e for e in episodes if episode_key(e) in val_ids]
    train = [e for e in episodes if episode_key(e) not in val_ids]
    if not val:
        raise ValueError("none of the policy's validation episodes is in the given --data files")
    return train, val


@torch.no_grad()
def features(policy: pm.TokenPolicy, draft_source: str, obs, task) -> torch.Tensor:
    """What the draft reads: [B, in_dim]."""
    if draft_source == "embedding":
        return policy.embed_obs(obs, task).flatten(1)
    return policy.obs_encoder.normalizer(obs)


@torch.no_grad()
def main_targets(policy, data: ChunkDataset, k: int, confidence: bool = False,
                 batch_size: int = 1024) -> tuple[torch.Tensor, list[float] | None]:
    """The main policy's dense greedy codes for layers 0..k-1 [M, T', k], and its mean top-1
    probability per layer along its own greedy path (all L layers; None unless ``confidence``).
    A low top-1 probability means the argmax sits among near-tied codes, which a cheap draft
    rarely reproduces."""
    codes, top1 = [], torch.zeros(policy.config.num_layers)
    for i in batches(len(data), batch_size, shuffle=False):
        greedy = policy.greedy_decode(data.obs[i], data.task[i])
        if confidence:
            probs = policy(data.obs[i], data.task[i], greedy).softmax(-1)  # [B, T', L, V]
            top1 += probs.max(-1).values.sum((0, 1))
        codes.append(greedy[..., :k])
    codes = torch.cat(codes)
    return codes, (top1 / (codes.shape[0] * codes.shape[1])).tolist() if confidence else None


@torch.no_grad()
def agreement(draft: pm.DraftModel, feats, task, targets) -> tuple[list[float], list[float], float]:
    """Per-layer agreement with the main policy's argmax, per position and per whole layer,
    and the expected exact acceptance rate: the mean length of the leading run of whole layers
    that agree, over k. Exact ``rsd`` accepts exactly that prefix (the main policy's greedy
    codes of the layers before are the accepted ones), so this is the acceptance rate ``rsd``
    would show on these observations. A chained draft reads the main policy's codes of the
    layers below each layer (``targets``): its per-layer agreement is given the layers below
    agree, and along the leading agreeing run its proposals are those codes, so the expected
    acceptance is the same measure for both kinds of draft."""
    draft.eval()
    pred = torch.cat([draft(feats[i], task[i], targets[i]).argmax(-1)
                      for i in batches(len(feats), 2048, shuffle=False)])
    match = pred == targets  # [M, T', k]
    layer = match.all(1)  # [M, k]
    accepted = layer.long().cumprod(1).sum(1).float()  # leading agreeing layers per chunk
    return (match.float().mean((0, 1)).tolist(), layer.float().mean(0).tolist(),
            float(accepted.mean()) / targets.shape[-1])


def rollout_data(files, policy, tokenizer, args, k: int | None = None):
    """The main policy's rollouts -> (train, main targets, val, main targets) of layers
    0..k-1 (default --k), split by episode (``training_rollouts``)."""
    k = k or args.k
    eps = training_rollouts(files, tokenizer.config.action_dim)
    tr_eps, val_eps = split_by_episode(eps, 0.1, seed=args.seed)
    c = policy.config
    kw = dict(history=c.action_history, num_layers=c.num_layers)  # executed actions: what the history holds online too
    tr = build_dataset(tr_eps, tokenizer, c.obs_keys, c.instructions, widths=c.obs_widths, **kw).to(args.device)
    val = build_dataset(val_eps, tokenizer, c.obs_keys, c.instructions, widths=c.obs_widths, **kw).to(args.device)
    return tr, main_targets(policy, tr, k)[0], val, main_targets(policy, val, k)[0]


def train_one(source, policy, train, val, t_train, t_val, args, n_tasks, rollouts=None):
    """rollouts: None, or (train ChunkDataset, its main targets, val ChunkDataset, its main
    targets) of the main policy's own rollouts; their chunks get no ground-truth loss."""
    c = policy.config
    f_train, f_val = features(policy, source, train.obs, train.task), features(policy, source, val.obs, val.task)
    task_train = train.task
    gt_train = train.codes[..., : args.k]
    has_gt = torch.ones(len(train), dtype=torch.bool, device=train.obs.device)
    if rollouts is not None:
        r_train, rt_train, r_val, rt_val = rollouts
        f_train = torch.cat([f_train, features(policy, source, r_train.obs, r_train.task)])
        task_train = torch.cat([task_train, r_train.task])
        t_train = torch.cat([t_train, rt_train])
        gt_train = torch.cat([gt_train, torch.zeros_like(rt_train)])
        has_gt = torch.cat([has_gt, torch.zeros(len(r_train), dtype=torch.bool, device=train.obs.device)])
        f_rval = features(policy, source, r_val.obs, r_val.task)
    in_dim = f_train.shape[1] + (32 if source == "obs" else 0)  # + the task embedding
    cfg = pm.DraftConfig(in_dim=in_dim, latent_steps=c.latent_steps, num_layers=args.k,
                         codebook_sizes=c.codebook_sizes[: args.k], source=source,
                         hidden=args.hidden, depth=args.depth, rank=args.rank, chained=args.chained,
                         step_hidden=args.step_hidden)
    torch.manual_seed(args.seed)
    draft = pm.DraftModel(cfg, num_tasks=n_tasks).to(train.obs.device)
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.01)
    n = len(f_train)
    steps = args.epochs * math.ceil(n / args.batch_size)
    sched = one_cycle(opt, args.lr, steps)
    gen = torch.Generator().manual_seed(args.seed)
    best, history = None, []
    for epoch in cli.progress(range(1, args.epochs + 1), desc=f"draft ({source})", unit="epoch"):
        draft.train()
        for idx in batches(n, args.batch_size, gen):
            # a chained draft reads the codes below each layer: the main policy's for its loss,
            # the ground truth's for the ground-truth loss
            logits = draft(f_train[idx], task_train[idx], t_train[idx])  # [B, T', k, V]
            loss = F.cross_entropy(logits.flatten(0, 2), t_train[idx].flatten())
            gt = has_gt[idx]
            if args.gt_weight > 0 and bool(gt.any()):
                g_codes = gt_train[idx][gt]
                g_logits = (draft(f_train[idx][gt], task_train[idx][gt], g_codes) if args.chained
                            else logits[gt])
                loss = loss + args.gt_weight * F.cross_entropy(g_logits.flatten(0, 2), g_codes.flatten())
            optimizer_step(opt, sched, loss, "draft", epoch)
        per_pos, per_layer, acc = agreement(draft, f_val, val.task, t_val)
        history.append({"epoch": epoch, "agreement": per_pos, "layer_agreement": per_layer,
                        "expected_acceptance": acc})
        score = sum(per_pos)
        if rollouts is not None:
            r_pos, r_layer, r_acc = agreement(draft, f_rval, r_val.task, rt_val)
            history[-1].update(rollout_agreement=r_pos, rollout_layer_agreement=r_layer,
                               rollout_expected_acceptance=r_acc)
            score += sum(r_pos)
        history[-1]["score"] = score
        if best is None or score > best["score"]:
            best = {**history[-1], "state": {k: v.clone() for k, v in draft.state_dict().items()}}
    draft.load_state_dict(best.pop("state"))
    return draft.eval(), best, history


@torch.no_grad()
def cost_ratio(policy: pm.TokenPolicy, draft: pm.DraftModel, data: ChunkDataset) -> dict:
    """Median batch-1 wall time, on one thread, of a draft pass and of a main pass (one dense
    decoding step, with the cache holding the ctx and the layers before it), plus FLOPs of each."""
    from torch.utils.flop_counter import FlopCounterMode

    obs, task = data.obs[:1], data.task[:1]
    L = policy.config.num_layers
    mid = L // 2
    codes = policy.greedy_decode(obs, task)

    def prepared_cache():
        cache = policy.new_cache()
        prev = torch.cat([torch.zeros_like(codes[..., :1]), codes[..., : mid - 1]], -1)
        policy.extend(cache, 0, mid, prev, policy.embed_obs(obs, task))
        return cache

    cache = prepared_cache()
    base = cache.length

    def main_pass():
        policy.extend(cache, mid, 1, codes[..., mid - 1: mid])
        cache.truncate(base)

    # The embedding draft reads the ctx embedding the main policy computes anyway for its
    # first pass, so only the draft's own layers are its cost; the obs draft pays for
    # normalizing the observation too.
    # The engine runs the draft in its folded form (pm.FusedDraft, the same function in fewer
    # operations); its proposal of all k layers (argmax) is the pass timed. The module's own
    # proposal is timed too, for reference.
    ctx_flat = policy.embed_obs(obs, task).flatten(1)
    fused = draft.fused()
    if draft.config.source == "embedding":
        def draft_pass():
            fused.propose(ctx_flat)

        def module_pass():
            draft.propose(ctx_flat)
    else:
        def draft_pass():
            fused.propose(policy.obs_encoder.normalizer(obs), task)

        def module_pass():
            draft.propose(policy.obs_encoder.normalizer(obs), task)

    # Timed on one thread, as eval_libero.py decodes (batch 1, --threads 1), whatever --threads
    # the training used.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        synced = [lambda fn=fn: (fn(), cli.synchronize(obs.device)) for fn in (main_pass, draft_pass, module_pass)]
        t_main, t_draft, t_module = interleaved_median_seconds(synced, repeats=300, warmup=30)
    finally:
        torch.set_num_threads(threads)
    with FlopCounterMode(display=False) as fc:
        main_pass()
    f_main = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        draft_pass()
    f_draft = fc.get_total_flops()
    return {"main_pass_us": t_main * 1e6, "draft_pass_us": t_draft * 1e6,
            "draft_main_cost_ratio": t_draft / t_main,
            "draft_module_pass_us": t_module * 1e6,
            "main_pass_flops": f_main, "draft_pass_flops": f_draft,
            "draft_main_flops_ratio": f_draft / max(f_main, 1)}


# ---------------------------------------------------------------- self-drafting heads (--heads)


def heads_targets(L: int, J: int, device=None) -> torch.Tensor:
    """[L, J] bool: whether head j + 1 at the block of layer l has a target, layer l + j + 1 <= L - 2
    (the last layer a pass can verify a proposal of)."""
    layer = torch.arange(L, device=device)[:, None] + torch.arange(1, J + 1, device=device)[None]
    return layer <= L - 2


@torch.no_grad()
def hidden_states(policy: pm.TokenPolicy, data: ChunkDataset, codes: torch.Tensor) -> torch.Tensor:
    """The frozen policy's final hidden states [M, T', L, d] of every chunk, teacher-forced with
    its own greedy codes ``codes`` [M, T', L]. Computed once: the heads read them every epoch
    (float32, M x T' x L x d x 4 bytes: 0.6 GB for 50 000 chunks of the default policy)."""
    policy.eval()
    c = policy.config
    parts = [policy(data.obs[idx], data.task[idx], codes[idx], hidden=True)[1]
             for idx in batches(len(data), 1024, shuffle=False)]
    return torch.cat(parts) if parts else torch.zeros(0, c.latent_steps, c.num_layers, c.d_model)


def shifted_targets(codes: torch.Tensor, J: int) -> torch.Tensor:
    """codes [B, T', L] -> [B, T', L, J]: entry (l, j) is layer l + j + 1's code (0 past the last layer)."""
    L = codes.shape[-1]
    padded = torch.cat([codes, torch.zeros_like(codes[..., :J])], -1)
    return torch.stack([padded[..., j + 1: j + 1 + L] for j in range(J)], -1)


@torch.no_grad()
def heads_agreement(heads: pm.DraftHeads, hidden: torch.Tensor, codes: torch.Tensor, majority: torch.Tensor) -> dict:
    """Per offset j (1..J), over the blocks whose proposals a pass verifies: agreement with the main
    policy's greedy codes per position and per whole layer, the whole-layer agreement of always
    proposing ``majority`` [T', L] (each target layer's most frequent code per position in the
    training targets), and the mean number of proposals a pass accepts, the leading run of whole
    layers that agree (of at most min(J, L - 2 - l) from the block of layer l)."""
    heads.eval()
    L, J = codes.shape[-1], heads.config.offsets
    valid = heads_targets(L, J, codes.device)  # [L, J]
    pos = torch.zeros(J, device=codes.device)
    whole = torch.zeros(J, device=codes.device)
    chance = torch.zeros(J, device=codes.device)
    run = torch.zeros((), device=codes.device)
    for idx in batches(len(codes), 1024, shuffle=False):
        pred = heads(hidden[idx], codes[idx]).argmax(-1)  # [B, T', L, J]
        target = shifted_targets(codes[idx], J)
        match = pred == target
        layer_ok = match.all(1) & valid  # [B, L, J]
        pos += (match.float().mean(1) * valid).sum((0, 1))
        whole += layer_ok.float().sum((0, 1))
        guess = shifted_targets(majority[None].expand_as(codes[idx]), J)
        chance += ((guess == target).all(1) & valid).float().sum((0, 1))
        run += layer_ok[:, : L - 2].long().cumprod(-1).sum()
    n = len(codes) * valid.sum(0).clamp(min=1)  # blocks per offset
    return {"agreement": (pos / n).tolist(), "layer_agreement": (whole / n).tolist(),
            "majority_layer_agreement": (chance / n).tolist(),
            "expected_accepted_per_pass": float(run) / (len(codes) * max(L - 2, 1)),
            "most_accepted_per_pass": float(valid[: L - 2].sum()) / max(L - 2, 1)}


def train_heads(policy, train, val, t_train, t_val, args, rollouts=None):
    """--heads: the heads distilled from the frozen policy's own greedy codes ``t_train`` [M, T', L]
    (and its rollouts'); the epoch with the best validation whole-layer agreement (summed over
    offsets, plus the held-out rollouts') is kept. Returns (heads, best epoch's metrics, history)."""
    c, J = policy.config, args.heads
    data_parts = [(train, t_train)] + ([(rollouts[0], rollouts[1])] if rollouts is not None else [])
    majority = torch.cat([t for _, t in data_parts]).mode(0).values  # [T', L]
    # the policy is frozen: its hidden states once, for every epoch
    data_parts = [(hidden_states(policy, data, codes), codes) for data, codes in data_parts]
    h_val = hidden_states(policy, val, t_val)
    h_rollout_val = None if rollouts is None else hidden_states(policy, rollouts[2], rollouts[3])
    cfg = pm.HeadsConfig(d_model=c.d_model, latent_steps=c.latent_steps, num_layers=c.num_layers,
                         codebook_sizes=c.codebook_sizes, offsets=J, hidden=args.heads_hidden)
    torch.manual_seed(args.seed)
    heads = pm.DraftHeads(cfg).to(train.obs.device)
    valid = heads_targets(c.num_layers, J, train.obs.device)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.01)
    sizes = [len(codes) for _, codes in data_parts]
    n = sum(sizes)
    sched = one_cycle(opt, args.lr, args.epochs * math.ceil(n / args.batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    best, history = None, []
    for epoch in cli.progress(range(1, args.epochs + 1), desc="heads", unit="epoch"):
        heads.train()
        for idx in batches(n, args.batch_size, gen):
            loss, count = 0.0, 0
            start = 0
            for (hidden, codes), size in zip(data_parts, sizes):  # the demos' chunks, then the rollouts'
                part = idx[(idx >= start) & (idx < start + size)] - start
                start += size
                if not len(part):
                    continue
                logits = heads(hidden[part], codes[part])  # [B, T', L, J, V]
                target = shifted_targets(codes[part], J)
                keep = valid[None, None].expand_as(target)
                loss = loss + F.cross_entropy(logits[keep], target[keep], reduction="sum")
                count += int(keep.sum())
            loss = loss / max(count, 1)
            optimizer_step(opt, sched, loss, "heads", epoch)
        metrics = heads_agreement(heads, h_val, t_val, majority)
        score = sum(metrics["layer_agreement"])
        if rollouts is not None:
            r = heads_agreement(heads, h_rollout_val, rollouts[3], majority)
            metrics.update({f"rollout_{k}": v for k, v in r.items()})
            score += sum(r["layer_agreement"])
        history.append({"epoch": epoch, **metrics, "score": score})
        if best is None or score > best["score"]:
            best = {**history[-1], "state": {k: v.clone() for k, v in heads.state_dict().items()}}
    heads.load_state_dict(best.pop("state"))
    return heads.eval(), best, history


def main_heads(args: DraftArgs, policy, pckpt, tok_path, tokenizer, data_files, train, val) -> dict:
    """--heads: train, save and report self-drafting heads (``train_heads``)."""
    L = policy.config.num_layers
    if not 1 <= args.heads <= L - 2:
        raise ValueError(f"--heads {args.heads}: a pass verifies proposals of layers up to L - 2, so heads on this "
                         f"{L}-layer policy propose 1..{L - 2} layers ahead" if L > 2 else
                         f"--heads: the policy {args.policy} has {L} layers; self-drafting needs at least 3")
    t0 = time.perf_counter()
    t_train, _ = main_targets(policy, train, L)
    t_val, _ = main_targets(policy, val, L)
    rollouts = None
    if args.rollouts:
        rollouts = rollout_data(args.rollouts, policy, tokenizer, args, k=L)
        log.info("rollouts: %d train chunks, %d validation chunks", len(rollouts[0]), len(rollouts[2]))
    heads, best, history = train_heads(policy, train, val, t_train, t_val, args, rollouts)
    wall = time.perf_counter() - t0
    metrics = {k: v for k, v in best.items() if k != "score"}
    provenance = {"args": cli.settings_dict(args), "seed": args.seed, "policy": os.path.abspath(args.policy),
                  "tokenizer": os.path.abspath(tok_path),
                  "data": {"files": [os.path.abspath(p) for p in data_files]}, "metrics": metrics}
    pm.save_heads(heads, args.output, file_sha256(args.policy), provenance)
    result = {"heads": args.heads, **metrics, "best_epoch": best["epoch"], "history": history,
              "chunks": {"train": len(train), "val": len(val)},
              **({"rollout_files": [os.path.abspath(p) for p in args.rollouts],
                  "rollout_chunks": {"train": len(rollouts[0]), "val": len(rollouts[2])}} if rollouts else {}),
              "train_seconds": wall, "output": args.output}
    print(f"\n{'offset':>6} | {'agree (position)':>16} | {'agree (layer)':>13} | {'most frequent code (layer)':>26}"
          + (" | rollouts: agree (layer)" if rollouts else ""))
    for j in range(args.heads):
        print(f"{j + 1:>6} | {result['agreement'][j]:16.3f} | {result['layer_agreement'][j]:13.3f} | "
              f"{result['majority_layer_agreement'][j]:26.3f}"
              + (f" | {result['rollout_layer_agreement'][j]:.3f}" if rollouts else ""))
    print(f"expected proposals accepted per pass on the validation demos: {result['expected_accepted_per_pass']:.3f} "
          f"(at most {result['most_accepted_per_pass']:.3f}); wrote {args.output}")
    cli.save_json(args.json, result, log)
    return result


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(DraftArgs, "Train the draft model that proposes the first k code layers cheaply, or "
                                     "self-drafting heads on the main policy (--heads) (phase 2).")

def main(args: DraftArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--output": args.output, "--json": args.json},
                  {"--policy": args.policy, "--data": args.data, "--tokenizer": args.tokenizer,
                   "--rollouts": args.rollouts})
    torch.set_num_threads(args.threads)
    policy, pckpt = pm.load_policy(args.policy)
    if policy.config.variant != "ar":
        raise ValueError(f"{args.policy} is a {policy.config.variant!r} policy; the draft serves the 'ar' policy")
    if args.heads is None and not 1 <= args.k <= policy.config.num_layers:
        raise ValueError(f"--k must be in 1..{policy.config.num_layers}, got {args.k}")
    tok_path = args.tokenizer or pckpt["provenance"]["tokenizer"]
    pm.load_policy(args.policy, tok_path)  # refuses a tokenizer other than the policy's
    tokenizer, _ = load_tokenizer(tok_path)
    data_files = args.data or pckpt["provenance"]["data"]["files"]
    episodes = load_episodes(data_files, action_dim=tokenizer.config.action_dim)
    train_eps, val_eps = split_like_policy(episodes, pckpt)
    instr = policy.config.instructions
    targets = pckpt["provenance"]["args"].get("targets", "actions")  # what the main policy imitated
    kw = dict(targets=targets, history=policy.config.action_history, num_layers=policy.config.num_layers,
              widths=policy.config.obs_widths)
    train = build_dataset(train_eps, tokenizer, policy.config.obs_keys, instr, **kw).to(args.device)
    val = build_dataset(val_eps, tokenizer, policy.config.obs_keys, instr, **kw).to(args.device)
    policy = policy.to(args.device)
    log.info("%d train chunks, %d validation chunks; computing the main policy's codes",
             len(train), len(val))
    if args.heads is not None:
        return main_heads(args, policy, pckpt, tok_path, tokenizer, data_files, train, val)
    t0 = time.perf_counter()
    t_train, _ = main_targets(policy, train, args.k)
    t_val, main_top1 = main_targets(policy, val, args.k, confidence=True)
    rollouts = None
    if args.rollouts:
        rollouts = rollout_data(args.rollouts, policy, tokenizer, args)
        log.info("rollouts: %d train chunks, %d validation chunks", len(rollouts[0]), len(rollouts[2]))

    sources = ["embedding", "obs"] if args.source == "both" else [args.source]
    results = {}
    for source in sources:
        draft, best, history = train_one(source, policy, train, val, t_train, t_val, args, len(instr),
                                         rollouts)
        results[source] = {"draft": draft, "best": best, "history": history,
                           "cost": cost_ratio(policy, draft, val)}
        log.info("%s draft: agreement %s, cost ratio %.3f", source,
                 [f"{a:.3f}" for a in best["agreement"]], results[source]["cost"]["draft_main_cost_ratio"])
    chosen = max(sources, key=lambda s: results[s]["best"]["score"])
    r = results[chosen]
    wall = time.perf_counter() - t0
    provenance = {"args": cli.settings_dict(args), "seed": args.seed, "policy": os.path.abspath(args.policy),
                  "tokenizer": os.path.abspath(tok_path),
                  "data": {"files": [os.path.abspath(p) for p in data_files]},
                  "metrics": {k: v for k, v in r["best"].items()}}
    pm.save_draft(r["draft"], args.output, file_sha256(args.policy), len(instr), provenance)

    result = {
        "source": chosen,
        "k": args.k,
        "agreement": r["best"]["agreement"],
        "layer_agreement": r["best"]["layer_agreement"],
        "expected_acceptance": r["best"]["expected_acceptance"],
        "best_epoch": r["best"]["epoch"],
        **({"rollout_agreement": r["best"]["rollout_agreement"],
            "rollout_layer_agreement": r["best"]["rollout_layer_agreement"],
            "rollout_expected_acceptance": r["best"]["rollout_expected_acceptance"],
            "rollout_files": [os.path.abspath(p) for p in args.rollouts],
            "rollout_chunks": {"train": len(rollouts[0]), "val": len(rollouts[2])}} if rollouts else {}),
        "main_top1_prob": main_top1,
        **r["cost"],
        "candidates": {s: {"agreement": v["best"]["agreement"],
                           "layer_agreement": v["best"]["layer_agreement"], **v["cost"]}
                       for s, v in results.items()},
        "train_seconds": wall,
        "output": args.output,
    }
    print(f"\n{'source':>10} | " + " | ".join(f"layer {l + 1} agree (chunk)" for l in range(args.k))
          + " | draft/main time | draft/main FLOPs")
    for s, v in result["candidates"].items():
        cells = " | ".join(f"{a:6.3f} ({b:5.3f})      " for a, b in zip(v["agreement"], v["layer_agreement"]))
        mark = "  <- kept" if s == chosen else ""
        print(f"{s:>10} | {cells} | {v['draft_main_cost_ratio']:15.3f} | {v['draft_main_flops_ratio']:.3f}{mark}")
    print(f"expected exact acceptance on the validation demos: {result['expected_acceptance']:.3f}")
    if rollouts:
        print("on held-out rollouts of the main policy: agreement "
              + " / ".join(f"{a:.3f} ({b:.3f})" for a, b in zip(result["rollout_agreement"],
                                                               result["rollout_layer_agreement"]))
              + f", expected exact acceptance {result['rollout_expected_acceptance']:.3f}")
    print("main policy's mean top-1 probability on validation, per layer: "
          + " ".join(f"L{l + 1} {p:.3f}" for l, p in enumerate(main_top1)))
    print(f"main pass {r['cost']['main_pass_us']:.0f} us, draft pass {r['cost']['draft_pass_us']:.0f} us "
          f"(folded, as the engine runs it; {r['cost']['draft_module_pass_us']:.0f} us through the "
          f"module) (median, batch 1); wrote {args.output}")
    cli.save_json(args.json, result, log)
    return result



if __name__ == "__main__":
    cli.run(main, build_parser())
