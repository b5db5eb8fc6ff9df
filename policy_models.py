"""Token policies over residual action codes: the main policy and the draft model.

The main policy predicts the codes of an action chunk, ``codes[B, T', L]`` from a phase-1
tokenizer, layer by layer, coarse to fine. Its transformer sees one sequence:

    [ctx tokens (observation, instruction)] [block 0: T' tokens] [block 1] ... [block L-1]

Block l's tokens carry the codes of layer l-1 (block 0 carries a start embedding) and
predict layer l's codes at every latent position. The attention mask is block-causal: a
token of block l sees the ctx and blocks 0..l, so layer l's prediction conditions on the
observation and on all codes of layers < l, at every position. Hence

- one teacher-forced forward predicts every layer at once (training, and verification of a
  draft's proposal), and
- dense decoding runs one pass per layer, each adding one block to a key/value cache.

The ``parallel`` variant is the one-pass baseline: block l carries no codes and sees only the
ctx and itself, so all layers come out of one pass, independently.

The draft model predicts the first k layers cheaply from the main policy's observation
embedding (before the transformer) through a trained projection: all k at once, or (a chained
draft) one small step per layer, each reading the codes proposed for the layers before it.

Self-drafting heads (``DraftHeads``, Medusa-style: Cai et al. 2024) sit on the main policy
itself: from the final hidden state of the block that predicts layer l (and layer l's chosen
codes), they propose the codes of layers l+1..l+J, so that every main pass can verify the
proposals of the pass before it.

Shapes: obs ``[B, obs_dim]``, task ``[B]`` (instruction index), codes ``[B, T', L]``,
logits ``[B, T', L, K]``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import file_sha256, save_torch

log = logging.getLogger(__name__)

POLICY_FORMAT = "rsd_token_policy"
DRAFT_FORMAT = "rsd_draft_model"
STOP_FORMAT = "rsd_stop_model"
HEADS_FORMAT = "rsd_self_draft_heads"
CHECKPOINT_VERSION = 1
VARIANTS = ("ar", "parallel")
# Low-dim observations: robot proprioception (joint pos/cos/sin/vel, EEF pose, gripper) and
# the object state LIBERO builds from every object's pose. Both have a fixed size per suite.
DEFAULT_OBS_KEYS = ("robot0_proprio-state", "object-state")


# --------------------------------------------------------------------------- configs


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a ``TokenPolicy``; stored in its checkpoint."""

    obs_dim: int
    instructions: tuple[str, ...]          # the instruction vocabulary (index = task token)
    latent_steps: int                      # T' of the tokenizer
    num_layers: int                        # L: the policy predicts the tokenizer's first L layers (train_policy --num_layers)
    codebook_sizes: tuple[int, ...]        # K_l of each of those layers
    obs_keys: tuple[str, ...] = DEFAULT_OBS_KEYS
    obs_widths: tuple[int, ...] = ()       # each key zero-padded to this many values (policy_data.obs_vector); (): none
    action_history: int = 0                # executed actions appended to the observation (policy_data)
    variant: str = "ar"                    # "ar" (block-causal over layers) | "parallel"
    d_model: int = 128
    n_heads: int = 4
    n_blocks: int = 4
    obs_tokens: int = 4                    # the observation becomes this many ctx tokens
    dropout: float = 0.1

    def __post_init__(self):
        self.instructions = tuple(self.instructions)
        self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        self.obs_keys = tuple(self.obs_keys)
        self.obs_widths = tuple(int(w) for w in self.obs_widths)
        if self.obs_widths and len(self.obs_widths) != len(self.obs_keys):
            raise ValueError(f"obs_widths {self.obs_widths} must give one width per observation key {self.obs_keys}")
        for name in ("obs_dim", "latent_steps", "num_layers", "d_model", "n_heads", "n_blocks",
                     "obs_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.action_history, (int, np.integer)) or self.action_history < 0:
            raise ValueError(f"action_history must be an integer >= 0, got {self.action_history!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if len(self.codebook_sizes) != self.num_layers or min(self.codebook_sizes) < 2:
            raise ValueError(f"codebook_sizes must list {self.num_layers} sizes >= 2, "
                             f"got {self.codebook_sizes}")
        if not self.instructions:
            raise ValueError("instructions must not be empty")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def vocab(self) -> int:
        """Output size of every layer head (the largest codebook; smaller layers are masked)."""
        return max(self.codebook_sizes)


@dataclass
class DraftConfig:
    """Everything needed to rebuild a ``DraftModel``; stored in its checkpoint."""

    in_dim: int              # size of its input features (main embedding or raw observation)
    latent_steps: int
    num_layers: int          # k: the draft proposes layers 0..k-1
    codebook_sizes: tuple[int, ...]
    source: str = "embedding"  # "embedding": main policy's obs embedding; "obs": raw normalized obs
    hidden: int = 256
    depth: int = 2
    rank: int = 32           # size of the factorized output head's vectors (not chained)
    chained: bool = False    # layer l's step also reads the codes of layers < l (DraftModel)
    step_hidden: int | None = None  # width of a chained draft's per-layer step (default: hidden)

    def __post_init__(self):
        self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        if not isinstance(self.chained, bool):
            raise ValueError(f"chained must be True or False, got {self.chained!r}")
        if self.step_hidden is not None and (not isinstance(self.step_hidden, (int, np.integer))
                                             or self.step_hidden < 1):
            raise ValueError(f"step_hidden must be a positive integer or None, got {self.step_hidden!r}")
        if self.source not in ("embedding", "obs"):
            raise ValueError(f"draft source must be 'embedding' or 'obs', got {self.source!r}")
        for name in ("in_dim", "latent_steps", "num_layers", "hidden", "depth", "rank"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if len(self.codebook_sizes) != self.num_layers:
            raise ValueError(f"codebook_sizes must list {self.num_layers} sizes, got {self.codebook_sizes}")


@dataclass
class StopConfig:
    """Everything needed to rebuild a ``StopModel``; stored in its checkpoint."""

    in_dim: int              # features per decoded layer (``rsd_engine_core.LearnedStop``)
    num_layers: int          # L of the main policy
    hidden: int = 64
    gap_eps: float = 0.01    # the model predicts log(gap + gap_eps)

    def __post_init__(self):
        for name in ("in_dim", "num_layers", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.gap_eps > 0:
            raise ValueError(f"gap_eps must be > 0, got {self.gap_eps!r}")


@dataclass
class HeadsConfig:
    """Everything needed to rebuild ``DraftHeads``; stored in its checkpoint."""

    d_model: int             # the main policy's width (its final hidden state)
    latent_steps: int
    num_layers: int          # L of the main policy
    codebook_sizes: tuple[int, ...]
    offsets: int = 2         # J: from the block of layer l, the heads propose layers l+1..l+J
    hidden: int = 64         # width of each offset's residual MLP

    def __post_init__(self):
        self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        for name in ("d_model", "latent_steps", "num_layers", "offsets", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if len(self.codebook_sizes) != self.num_layers:
            raise ValueError(f"codebook_sizes must list {self.num_layers} sizes, got {self.codebook_sizes}")
        if self.offsets > self.num_layers - 2:
            raise ValueError(f"offsets {self.offsets}: a pass can verify proposals of layers up to L - 2, so "
                             f"a policy of {self.num_layers} layers takes at most {max(self.num_layers - 2, 0)}")


# --------------------------------------------------------------------------- normalizer


class ObsNormalizer(nn.Module):
    """Per-dimension standardization of observations, stored as buffers."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, obs: np.ndarray) -> "ObsNormalizer":
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if not bool(torch.isfinite(obs).all()):
            bad = torch.nonzero(~torch.isfinite(obs))[0].tolist()
            raise ValueError(f"observations hold NaN or inf (row {bad[0]}, feature {bad[1]}): the normalizer "
                             "would make every weight trained through it NaN")
        self.mean.copy_(obs.mean(0))
        # constant dimensions (a fixture that never moves) keep unit scale
        self.std.copy_(obs.std(0).clamp(min=1e-3))
        return self

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


# --------------------------------------------------------------------------- transformer


class KVCache:
    """Keys and values of every transformer block for the tokens processed so far.

    k[i], v[i]: [B, H, S, hd]; ``blocks`` holds the block id of each cached token
    (-1 for ctx tokens, l for the tokens of code block l).
    """

    def __init__(self, n_blocks: int, device=None):
        self.k: list[torch.Tensor | None] = [None] * n_blocks
        self.v: list[torch.Tensor | None] = [None] * n_blocks
        self.blocks = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return int(self.blocks.numel())

    def truncate(self, length: int) -> None:
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i][:, :, :length]
                self.v[i] = self.v[i][:, :, :length]
        self.blocks = self.blocks[:length]

    def keep(self, index: torch.Tensor) -> None:
        """Keep the cached tokens at ``index`` [S'] (increasing), drop the others."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i].index_select(2, index)
                self.v[i] = self.v[i].index_select(2, index)
        self.blocks = self.blocks.index_select(0, index)


class Block(nn.Module):
    """Pre-LN transformer block with an explicit attention mask and an optional KV cache."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x, mask, cache: KVCache | None = None, index: int = 0):
        """x: [B, N, d]; mask: [N, S] bool (True = may attend), S = cached + N tokens."""
        B, N, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache.k[index] is not None:
                k = torch.cat([cache.k[index], k], 2)
                v = torch.cat([cache.v[index], v], 2)
            cache.k[index], cache.v[index] = k, v
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, N, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class ObsEncoder(nn.Module):
    """Observation and instruction -> ctx embedding [B, obs_tokens + 1, d]."""

    def __init__(self, c: PolicyConfig):
        super().__init__()
        self.c = c
        self.normalizer = ObsNormalizer(c.obs_dim)
        self.mlp = nn.Sequential(
            nn.Linear(c.obs_dim, 2 * c.d_model), nn.GELU(),
            nn.Linear(2 * c.d_model, c.obs_tokens * c.d_model))
        self.task = nn.Embedding(len(c.instructions), c.d_model)

    def forward(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        B = obs.shape[0]
        tokens = self.mlp(self.normalizer(obs)).view(B, self.c.obs_tokens, self.c.d_model)
        return torch.cat([tokens, self.task(task)[:, None]], 1)


class TokenPolicy(nn.Module):
    """Main policy: observation -> codes [B, T', L], autoregressive over layers (variant ar)
    or all layers in one pass (variant parallel)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = c = config
        self.obs_encoder = ObsEncoder(c)
        L, Tp, d = c.num_layers, c.latent_steps, c.d_model
        self.n_ctx = c.obs_tokens + 1
        self.start = nn.Parameter(torch.zeros(1, 1, d))
        # one embedding table per layer: code c of layer l is row offset[l] + c
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(c.codebook_sizes)[:-1]]),
                             persistent=False)
        self.code_emb = nn.Embedding(sum(c.codebook_sizes), d)
        self.pos_emb = nn.Parameter(torch.zeros(1, Tp, d))
        self.layer_emb = nn.Parameter(torch.zeros(L, 1, d))
        self.ctx_pos = nn.Parameter(torch.zeros(1, self.n_ctx, d))
        self.blocks = nn.ModuleList(Block(d, c.n_heads, c.dropout) for _ in range(c.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head_w = nn.Parameter(torch.empty(L, c.vocab, d))
        self.head_b = nn.Parameter(torch.zeros(L, c.vocab))
        nn.init.normal_(self.head_w, std=0.02)
        for p in (self.start, self.pos_emb, self.layer_emb, self.ctx_pos):
            nn.init.normal_(p, std=0.02)
        # codes a layer cannot emit (its codebook is smaller than vocab) get -inf logits
        invalid = torch.zeros(L, c.vocab, dtype=torch.bool)
        for l, k in enumerate(c.codebook_sizes):
            invalid[l, k:] = True
        self.register_buffer("invalid", invalid, persistent=False)

    # ---- pieces
    def embed_obs(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The observation embedding (before the transformer): [B, n_ctx, d]. The draft reads it."""
        return self.obs_encoder(obs, task) + self.ctx_pos

    def _block_inputs(self, prev_codes: torch.Tensor | None, first: int, n: int, B: int) -> torch.Tensor:
        """Input tokens of code blocks first..first+n-1: [B, n*T', d].

        prev_codes[..., j] must hold layer (first - 1 + j)'s codes (only read for layers >= 0).
        """
        c = self.config
        out = []
        for j, l in enumerate(range(first, first + n)):
            if l == 0 or c.variant == "parallel":
                x = self.start.expand(B, c.latent_steps, -1)
            else:
                x = self.code_emb(prev_codes[..., j] + self.offsets[l - 1])
            out.append(x + self.pos_emb + self.layer_emb[l])
        return torch.cat(out, 1)

    def _mask(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor) -> torch.Tensor:
        """[N, S] bool: block-causal (ar) or ctx + own block (parallel)."""
        qb, kb = q_blocks[:, None], k_blocks[None, :]
        if self.config.variant == "parallel":
            return (kb == -1) | (kb == qb)
        return kb <= qb

    def _heads(self, h: torch.Tensor, layers: list[int], hidden: bool = False):
        """h: [B, n*T', d] for code blocks ``layers`` -> logits [B, T', n, vocab]; with ``hidden``,
        (logits, the final hidden states the logits are read from [B, T', n, d])."""
        B, Tp = h.shape[0], self.config.latent_steps
        h = self.ln_f(h).view(B, len(layers), Tp, -1)
        idx = torch.as_tensor(layers, device=h.device)
        logits = torch.einsum("bntd,nkd->btnk", h, self.head_w[idx]) + self.head_b[idx][None, None]
        logits = logits.masked_fill(self.invalid[idx][None, None], float("-inf"))
        return (logits, h.transpose(1, 2)) if hidden else logits

    def _run(self, x, q_blocks, cache: KVCache | None):
        k_blocks = q_blocks if cache is None else torch.cat([cache.blocks, q_blocks])
        x = self.run_masked(x, self._mask(q_blocks, k_blocks), cache)
        if cache is not None:
            cache.blocks = k_blocks
        return x

    def run_masked(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x [B, N, d] through the transformer blocks under ``mask`` [N, S] (True = may attend; S
        = cached + N tokens), appending the N tokens' keys and values to the cache (its
        ``blocks`` are the caller's to update) -> [B, N, d] before the final norm."""
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, cache, i)
        return x

    # ---- training / verification: all layers in one pass
    def forward(self, obs: torch.Tensor, task: torch.Tensor, codes: torch.Tensor | None = None,
                num_layers: int | None = None, hidden: bool = False):
        """Teacher-forced logits for layers 0..n-1: [B, T', n, vocab] (n = num_layers or L); with
        ``hidden``, (logits, final hidden states [B, T', n, d]: what ``DraftHeads`` reads).

        codes: [B, T', >= n-1] ground-truth (or proposed) codes; block l reads codes[..., l-1].
        Needed for the ar variant when n > 1.
        """
        c = self.config
        n = num_layers or c.num_layers
        B = obs.shape[0]
        ctx = self.embed_obs(obs, task)
        prev = None if n == 1 or c.variant == "parallel" else codes[..., : n - 1]
        if prev is not None:
            prev = torch.cat([torch.zeros_like(prev[..., :1]), prev], -1)  # slot for layer -1
        x = torch.cat([ctx, self._block_inputs(prev, 0, n, B)], 1)
        q_blocks = self.token_blocks(0, n)
        h = self._run(x, q_blocks, None)
        return self._heads(h[:, self.n_ctx:], list(range(n)), hidden)

    def token_blocks(self, first: int, n: int, with_ctx: bool = True) -> torch.Tensor:
        Tp = self.config.latent_steps
        blocks = torch.arange(first, first + n).repeat_interleave(Tp)
        if with_ctx:
            blocks = torch.cat([torch.full((self.n_ctx,), -1), blocks])
        return blocks.to(self.start.device)

    # ---- decoding with a cache: one call = one main pass
    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.start.device)

    def extend(self, cache: KVCache, first: int, n: int, prev_codes: torch.Tensor | None,
               ctx: torch.Tensor | None = None, hidden: bool = False):
        """One main pass: append code blocks first..first+n-1 to the cache (and the ctx tokens
        when the cache is empty) and return their logits [B, T', n, vocab]; with ``hidden``,
        (logits, the blocks' final hidden states [B, T', n, d]: what ``DraftHeads`` reads).

        prev_codes[..., j] holds layer (first - 1 + j)'s codes, j = 0..n-1 (ignored for layer -1).
        The cache must hold exactly the ctx and blocks 0..first-1.
        """
        if ctx is None and cache.length == 0:
            raise ValueError("the first pass needs the ctx embedding")
        B = (ctx if ctx is not None else cache.k[0]).shape[0]
        x = self._block_inputs(prev_codes, first, n, B)
        q_blocks = self.token_blocks(first, n, with_ctx=ctx is not None)
        if ctx is not None:
            x = torch.cat([ctx, x], 1)
        h = self._run(x, q_blocks, cache)
        return self._heads(h[:, -n * self.config.latent_steps:], list(range(first, first + n)), hidden)

    def extend_tree(self, cache: KVCache, layers: list[int], parents: list[int], codes: torch.Tensor,
                    ctx: torch.Tensor | None = None) -> torch.Tensor:
        """One main pass over a tree of code blocks (token-tree verification: SpecInfer, Miao et
        al. 2024): node i is a block of layer ``layers[i]`` whose tokens carry ``codes[..., i]``
        (the codes of layer layers[i] - 1 on its path; not read at layer 0), below node
        ``parents[i]`` (-1: below the cached blocks; parents come before their children). A
        node's tokens see the ctx, the cached blocks, its ancestors' tokens and its own, so its
        logits are those of extending the cache with its path block by block, up to float
        rounding. Returns the nodes' logits [B, T', n, vocab]; appends the ctx (when given) and
        every node's tokens to the cache, of which ``keep_path`` then keeps one path.

        codes: [B, T', n].
        """
        if ctx is None and cache.length == 0:
            raise ValueError("the first pass needs the ctx embedding")
        Tp, n, device = self.config.latent_steps, len(parents), self.start.device
        B = (ctx if ctx is not None else cache.k[0]).shape[0]
        first = int(cache.blocks.max()) + 1 if cache.length else 0
        above = []  # above[i]: node i's ancestors and itself
        for i, (layer, p) in enumerate(zip(layers, parents)):
            want = first if p < 0 else layers[p] + 1
            if not (p < i and layer == want):
                raise ValueError(f"tree node {i} (layer {layer}) must follow its parent {p}, one layer deeper "
                                 f"(layer {want})")
            above.append((above[p] if p >= 0 else set()) | {i})
        # per token: a node's T' tokens see each other, as in a block
        tree = torch.tensor([[j in above[i] for j in range(n)] for i in range(n)], device=device)
        tree = tree.repeat_interleave(Tp, 0).repeat_interleave(Tp, 1)
        layer_index = torch.tensor(layers, device=device)
        x = self._node_inputs(codes, layer_index)
        n_ctx = ctx.shape[1] if ctx is not None else 0
        seen = cache.length + n_ctx  # what every node sees: the cached tokens and the ctx
        mask = torch.cat([torch.ones(n * Tp, seen, dtype=torch.bool, device=device), tree], 1)
        blocks = layer_index.repeat_interleave(Tp)
        if ctx is not None:
            ctx_rows = torch.zeros(n_ctx, seen + n * Tp, dtype=torch.bool, device=device)
            ctx_rows[:, :seen] = True
            mask = torch.cat([ctx_rows, mask], 0)
            x = torch.cat([ctx, x], 1)
            blocks = torch.cat([torch.full((n_ctx,), -1, device=device), blocks])
        h = self.run_masked(x, mask, cache)
        cache.blocks = torch.cat([cache.blocks, blocks])
        return self._heads(h[:, -n * Tp:], layers)

    def _node_inputs(self, codes: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Input tokens of tree nodes (``extend_tree``): codes [B, T', n], layers [n] -> [B, n*T', d]."""
        B, Tp, n = codes.shape
        rows = codes + self.offsets[(layers - 1).clamp(min=0)]
        x = torch.where((layers == 0)[:, None, None], self.start, self.code_emb(rows.transpose(1, 2)))
        x = x + self.pos_emb[:, None] + self.layer_emb[layers][None]  # [B, n, T', d]
        return x.reshape(B, n * Tp, -1)

    def keep_path(self, cache: KVCache, n_nodes: int, path: list[int]) -> None:
        """After ``extend_tree`` over ``n_nodes`` nodes: keep the cache's tokens before the tree
        and those of the nodes ``path`` (root first), so that it holds what extending the cache
        with that path block by block would hold."""
        Tp = self.config.latent_steps
        start = cache.length - n_nodes * Tp
        nodes = torch.as_tensor(path, device=cache.blocks.device)
        tokens = (start + nodes[:, None] * Tp + torch.arange(Tp, device=nodes.device)).flatten()
        cache.keep(torch.cat([torch.arange(start, device=nodes.device), tokens]))

    @torch.no_grad()
    def greedy_decode(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Dense greedy decoding of a batch: codes [B, T', L] (ar: one pass per layer)."""
        if self.config.variant == "parallel":
            return self(obs, task).argmax(-1)
        cache, ctx = self.new_cache(), self.embed_obs(obs, task)
        codes = []
        for l in range(self.config.num_layers):
            prev = codes[-1][..., None] if l else None
            codes.append(self.extend(cache, l, 1, prev, ctx if l == 0 else None)[:, :, 0].argmax(-1))
        return torch.stack(codes, -1)

    def keep_blocks(self, cache: KVCache, n_blocks: int) -> None:
        """Drop cached code blocks >= n_blocks (their inputs were rejected proposals)."""
        cache.truncate(self.n_ctx + n_blocks * self.config.latent_steps)


class DraftModel(nn.Module):
    """Predicts layers 0..k-1 cheaply: input features -> logits [B, T', k, vocab].

    ``source == "embedding"``: input = the main policy's observation embedding [B, n_ctx, d]
    flattened (computed anyway before the main's first pass), through a trained projection.
    ``source == "obs"``: input = the normalized raw observation and a task embedding.

    Not chained (the default), all k layers come out of one pass, each latent position and
    layer on its own; the output head is factorized (hidden -> T'*k vectors of size ``rank``
    -> a shared rank -> vocab projection): a full hidden -> T'*k*vocab matrix would cost as
    much as a main pass.

    Chained (``config.chained``), layer l has its own small step: the trunk's output plus an
    embedding of the codes of layers 0..l-1 (one vector per layer, latent position and code,
    summed), a hidden layer (``step_hidden`` wide), and a head to its T' x vocab logits. A
    layer's codes depend on the codes chosen below it (each layer quantizes what the layers
    below left), which a one-pass draft can only guess at; exact speculation only gains from
    layer l when layers 0..l-1 were accepted, i.e. equal the main policy's codes, so training
    feeds the main policy's codes of the layers below (teacher forcing) and the engine feeds
    the draft's own proposals (``propose``).
    """

    def __init__(self, config: DraftConfig, num_tasks: int = 1):
        super().__init__()
        self.config = c = config
        self.vocab = max(c.codebook_sizes)
        layers: list[nn.Module] = [nn.Linear(c.in_dim, c.hidden), nn.GELU()]
        for _ in range(c.depth - 1):
            layers += [nn.Linear(c.hidden, c.hidden), nn.GELU()]
        self.trunk = nn.Sequential(*layers)
        if c.chained:
            # row t * vocab + code of table l: code `code` at latent position t of layer l
            self.code_emb = nn.Parameter(torch.zeros(c.num_layers - 1, c.latent_steps * self.vocab, c.hidden))
            width = c.step_hidden or c.hidden
            self.steps = nn.ModuleList(nn.Linear(c.hidden, width) for _ in range(c.num_layers))
            self.heads = nn.ModuleList(nn.Linear(width, c.latent_steps * self.vocab)
                                       for _ in range(c.num_layers))
        else:
            self.proj = nn.Linear(c.hidden, c.latent_steps * c.num_layers * c.rank)
            # one output embedding shared by all layers and positions (the projection already
            # gives each (position, layer) its own vector); a bias per layer
            self.out_w = nn.Parameter(torch.randn(c.rank, self.vocab) / math.sqrt(c.rank))
            self.out_b = nn.Parameter(torch.zeros(c.num_layers, self.vocab))
        if c.source == "obs":
            self.task = nn.Embedding(num_tasks, 32)
        invalid = torch.zeros(c.num_layers, self.vocab, dtype=torch.bool)
        for l, k in enumerate(c.codebook_sizes):
            invalid[l, k:] = True
        self.register_buffer("invalid", invalid, persistent=False)
        self.register_buffer("position_rows", torch.arange(c.latent_steps) * self.vocab, persistent=False)
        self.mask_needed = bool(invalid.any())

    def _trunk(self, features, task):
        if self.config.source == "obs":
            features = torch.cat([features, self.task(task)], -1)
        return self.trunk(features)

    def _step(self, z: torch.Tensor, l: int) -> torch.Tensor:
        """Chained: the running input z [B, hidden] -> layer l's logits [B, T', vocab]."""
        logits = self.heads[l](F.gelu(self.steps[l](z))).view(-1, self.config.latent_steps, self.vocab)
        return logits.masked_fill(self.invalid[l], float("-inf")) if self.mask_needed else logits

    def _add_codes(self, z: torch.Tensor, l: int, codes: torch.Tensor) -> torch.Tensor:
        """Chained: z plus the embedding of layer l's codes [B, T']."""
        return z + self.code_emb[l][codes + self.position_rows].sum(1)

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> torch.Tensor:
        """features: [B, in_dim] (source "obs": [B, obs_dim] and task [B]) -> logits [B, T', k, vocab].

        A chained draft needs ``codes`` [B, T', >= k-1]: the codes of the layers below each
        layer's step (teacher forcing; the main policy's codes in training). ``propose`` feeds
        its own."""
        c = self.config
        h = self._trunk(features, task)
        if c.chained:
            return _teacher_forced(self, h, codes)
        h = self.proj(h).view(-1, c.latent_steps, c.num_layers, c.rank)
        logits = h @ self.out_w + self.out_b
        return logits.masked_fill(self.invalid, float("-inf")) if self.mask_needed else logits

    def propose(self, features: torch.Tensor, task: torch.Tensor | None = None, k: int | None = None,
                pick=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's proposal for layers 0..k-1: (logits [B, T', k, vocab], codes [B, T', k]).
        ``pick`` (logits [B, T', vocab] -> codes [B, T']) chooses each layer's codes, argmax by
        default; a chained draft conditions each layer on the codes picked below it."""
        return _propose(self, features, task, k, pick)

    def fused(self) -> "FusedDraft":
        """The inference form of this draft as its weights are now (see ``FusedDraft``)."""
        return FusedDraft(self)


def _teacher_forced(draft, h, codes):
    """A chained draft's logits [B, T', k, vocab] from its trunk output h with the given codes
    of the layers below each step (``DraftModel`` or ``FusedDraft``)."""
    k = draft.config.num_layers
    if codes is None or codes.shape[-1] < k - 1:
        raise ValueError(f"a chained draft needs the codes of layers 0..{k - 2} (codes [B, T', >= {k - 1}]), "
                         f"got {None if codes is None else tuple(codes.shape)}")
    out = [draft._step(h, 0)]
    for l in range(1, k):
        h = draft._add_codes(h, l - 1, codes[..., l - 1])
        out.append(draft._step(h, l))
    return torch.stack(out, 2)


def _propose(draft, features, task, k, pick):
    """``propose`` of a ``DraftModel`` or a ``FusedDraft`` (the two share ``_trunk``, ``_step``,
    ``_add_codes`` and calling them)."""
    c = draft.config
    k = c.num_layers if k is None else k
    if not 1 <= k <= c.num_layers:
        raise ValueError(f"k must be in 1..{c.num_layers}, got {k}")
    if not c.chained:
        logits = draft(features, task)[:, :, :k]
        if pick is None:
            return logits, logits.argmax(-1)
        return logits, torch.stack([pick(logits[:, :, l]) for l in range(k)], -1)
    pick = pick or (lambda logits: logits.argmax(-1))
    h = draft._trunk(features, task)
    out, codes = [], []
    for l in range(k):
        if l:
            h = draft._add_codes(h, l - 1, codes[-1])
        out.append(draft._step(h, l))
        codes.append(pick(out[-1]))
    return torch.stack(out, 2), torch.stack(codes, -1)


class FusedDraft:
    """A ``DraftModel`` folded for batch-1 inference: the same function in fewer operations.

    At batch 1 a pass of a small MLP costs mostly per-operation overhead (module calls,
    dispatch), not arithmetic. Exact rewrites remove operations:

    - the factorized head (``proj``, then ``out_w`` and ``out_b``) is linear, so it becomes one
      matrix ``[T'*k*vocab, hidden]`` with one bias; codes a layer cannot emit get a -inf bias
      (a chained draft's heads too);
    - the obs draft's task embedding enters the first layer linearly, so it becomes a bias per
      task;
    - the layers run as ``torch.addmm`` and ``gelu`` on plain tensors, no module calls.

    Logits equal ``DraftModel.forward`` up to float rounding (tested). It is a snapshot:
    build it again after the draft's weights change.
    """

    def __init__(self, draft: DraftModel):
        c = draft.config
        self.config, self.vocab = c, draft.vocab
        with torch.no_grad():
            linears = [m for m in draft.trunk if isinstance(m, nn.Linear)]
            first = linears[0]
            w0, b0 = first.weight, first.bias
            if c.source == "obs":  # [obs | task embedding] @ W0^T = obs @ W_obs^T + per-task bias
                n_in = w0.shape[1] - draft.task.embedding_dim
                self.task_bias = (draft.task.weight @ w0[:, n_in:].T + b0).contiguous()  # [tasks, hidden]
                w0 = w0[:, :n_in]
            else:
                self.task_bias = None
            self.first = (w0.T.contiguous(), b0.clone())
            self.rest = [(m.weight.T.contiguous(), m.bias.clone()) for m in linears[1:]]
            if c.chained:
                self.code_emb = draft.code_emb.detach().clone()
                self.position_rows = draft.position_rows.clone()
                self.steps = [(m.weight.T.contiguous(), m.bias.clone()) for m in draft.steps]
                self.heads = []
                for l, m in enumerate(draft.heads):
                    b = m.bias.view(c.latent_steps, self.vocab).masked_fill(draft.invalid[l], float("-inf"))
                    self.heads.append((m.weight.T.contiguous(), b.reshape(-1).contiguous()))
            else:
                P = draft.proj.weight.view(c.latent_steps, c.num_layers, c.rank, -1)  # [T', k, r, hidden]
                w = torch.einsum("tkrh,rv->tkvh", P, draft.out_w).reshape(-1, P.shape[-1])
                pb = draft.proj.bias.view(c.latent_steps, c.num_layers, c.rank)
                b = pb @ draft.out_w + draft.out_b  # [T', k, vocab]
                b = b.masked_fill(draft.invalid, float("-inf"))
                self.head = (w.T.contiguous(), b.reshape(-1).contiguous())

    def _trunk(self, features, task):
        w0, b0 = self.first
        h = F.gelu(torch.addmm(self.task_bias[task] if self.task_bias is not None else b0, features, w0))
        for w, b in self.rest:
            h = F.gelu(torch.addmm(b, h, w))
        return h

    def _step(self, z, l):
        (ws, bs), (wh, bh) = self.steps[l], self.heads[l]
        logits = torch.addmm(bh, F.gelu(torch.addmm(bs, z, ws)), wh)
        return logits.view(-1, self.config.latent_steps, self.vocab)

    def _add_codes(self, z, l, codes):
        return z + self.code_emb[l][codes + self.position_rows].sum(1)

    def __call__(self, features: torch.Tensor, task: torch.Tensor | None = None,
                 codes: torch.Tensor | None = None) -> torch.Tensor:
        """Same inputs and output as ``DraftModel.forward``: logits [B, T', k, vocab]."""
        c = self.config
        h = self._trunk(features, task)
        if c.chained:
            return _teacher_forced(self, h, codes)
        w, b = self.head
        return torch.addmm(b, h, w).view(-1, c.latent_steps, c.num_layers, self.vocab)

    def propose(self, features: torch.Tensor, task: torch.Tensor | None = None, k: int | None = None,
                pick=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``DraftModel.propose``."""
        return _propose(self, features, task, k, pick)


class StopModel(nn.Module):
    """Adaptive depth's learned stop signal: from what the decoder knows once a layer is
    decoded (features built by ``rsd_engine_core.LearnedStop``), the action gap of stopping
    there, i.e. the max abs difference (normalized action units) between the actions of the
    layers so far and those of all L. Trained by ``train_stop.py`` on the main policy's own dense
    decoding of recorded states. It predicts log(gap + gap_eps); the inputs are standardized
    with the training set's statistics, kept as buffers."""

    def __init__(self, config: StopConfig):
        super().__init__()
        self.config = c = config
        self.register_buffer("mean", torch.zeros(c.in_dim))
        self.register_buffer("std", torch.ones(c.in_dim))
        self.net = nn.Sequential(nn.Linear(c.in_dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> predicted log(gap + gap_eps) [N]."""
        return self.net((x - self.mean) / self.std)[:, 0]

    def predicted_gap(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> the predicted action gap [N] (normalized action units)."""
        return self(x).exp() - self.config.gap_eps

    def fused(self) -> "FusedStop":
        """The batch-1 inference form of this model as its weights are now (``FusedStop``)."""
        return FusedStop(self)


class FusedStop:
    """A ``StopModel`` whose input ends with a one-hot of the layer (``LearnedStop``'s
    features), folded for one call per decoded layer: the standardization goes into the first
    layer's weights, and the one-hot's column of them into a bias per layer, so a call is two
    ``addmm`` and a ``gelu`` on the rest of the input. Equals ``StopModel.forward`` up to float
    rounding (tested); a snapshot of the weights."""

    def __init__(self, model: StopModel):
        c = model.config
        first, last = model.net[0], model.net[2]
        with torch.no_grad():
            w = first.weight / model.std                       # [hidden, in_dim]
            b = first.bias - w @ model.mean
            d = c.in_dim - c.num_layers                         # where the one-hot starts
            self.w1 = w[:, :d].T.contiguous()                   # [d, hidden]
            self.b1 = (b[None] + w[:, d:].T).contiguous()       # [L, hidden]: bias of layer l
            self.w2, self.b2 = last.weight.T.clone(), last.bias.clone()  # [hidden, 1], [1]

    def __call__(self, x: torch.Tensor, layer: int) -> float:
        """x: [1, in_dim - L] (the features before the one-hot) -> predicted log(gap + gap_eps)."""
        return float(torch.addmm(self.b2, F.gelu(torch.addmm(self.b1[layer], x, self.w1)), self.w2))


def _check_proposal(c: HeadsConfig, layer: int, n: int) -> None:
    """Heads of ``c`` propose 1..J layers after ``layer``, none past the last: else a ValueError."""
    if not (1 <= n <= c.offsets and layer + n < c.num_layers):
        raise ValueError(f"the heads propose 1..{c.offsets} layers after layer {layer}, up to layer "
                         f"{c.num_layers - 1}; asked for {n}")


class DraftHeads(nn.Module):
    """Self-drafting heads on a main policy (Medusa-style: Cai et al. 2024): from the final
    hidden state h of the block that predicts layer l, at every latent position, and the codes
    chosen for layer l there, head j (j = 1..J) proposes the codes of layer l + j.

    The block of layer l has read the observation and every code below l, so its hidden state
    holds what the main policy knows when it predicts layer l; the layers after l depend on the
    code chosen for l (each layer quantizes what the layers below left), which the heads read as
    an embedding added to h. Head j is one residual MLP, x + W2 gelu(W1 x), and an output table
    per target layer (``head_w[j - 1, layer]``, as the policy's own per-layer heads), so a
    proposal costs a few small matrix products at batch 1. The policy stays frozen: the heads
    are distilled from its own dense greedy codes (``train_draft.py --heads``).

    Shapes: hidden [B, T', n, d] of blocks 0..n-1, codes [B, T', n] -> logits
    [B, T', n, J, vocab]: entry (l, j - 1) proposes layer l + j (targets past the last layer
    are masked, -inf).
    """

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = c = config
        J, L, d, w = c.offsets, c.num_layers, c.d_model, c.hidden
        self.vocab = max(c.codebook_sizes)
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(c.codebook_sizes)[:-1]]), persistent=False)
        self.code_emb = nn.Embedding(sum(c.codebook_sizes), d)  # layer l's chosen codes, row offsets[l] + code
        nn.init.normal_(self.code_emb.weight, std=0.02)
        self.up_w = nn.Parameter(torch.randn(J, d, w) / math.sqrt(d))
        self.up_b = nn.Parameter(torch.zeros(J, w))
        self.down_w = nn.Parameter(torch.zeros(J, w, d))  # each head starts as the identity on x
        self.down_b = nn.Parameter(torch.zeros(J, d))
        self.head_w = nn.Parameter(torch.randn(J, L, self.vocab, d) * 0.02)
        self.head_b = nn.Parameter(torch.zeros(J, L, self.vocab))
        invalid = torch.zeros(L, self.vocab, dtype=torch.bool)
        for l, k in enumerate(c.codebook_sizes):
            invalid[l, k:] = True
        self.register_buffer("invalid", invalid, persistent=False)

    def _body(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Head j + 1's residual MLP on x [..., d]."""
        return x + F.gelu(x @ self.up_w[j] + self.up_b[j]) @ self.down_w[j] + self.down_b[j]

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """hidden [B, T', n, d], codes [B, T', n] of blocks / layers 0..n-1 -> logits [B, T', n, J, vocab]."""
        c = self.config
        n = hidden.shape[2]
        x = hidden + self.code_emb(codes + self.offsets[:n])
        out = []
        for j in range(c.offsets):
            target = torch.arange(n, device=hidden.device) + j + 1
            past = target >= c.num_layers
            target = target.clamp(max=c.num_layers - 1)
            z = self._body(x, j)
            logits = torch.einsum("btnd,nkd->btnk", z, self.head_w[j, target]) + self.head_b[j, target]
            out.append(logits.masked_fill(self.invalid[target] | past[:, None], float("-inf")))
        return torch.stack(out, 3)

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, code: torch.Tensor, layer: int, n: int) -> torch.Tensor:
        """From the block of layer ``layer`` (hidden [B, T', d]) and the codes chosen for the layer
        [B, T']: the argmax proposal for layers layer+1..layer+n, codes [B, T', n]."""
        _check_proposal(self.config, layer, n)
        x = hidden + self.code_emb.weight[self.offsets[layer] + code]
        out = []
        for j in range(n):
            t = layer + j + 1
            logits = self._body(x, j) @ self.head_w[j, t].T + self.head_b[j, t]
            out.append(logits.masked_fill(self.invalid[t], float("-inf")).argmax(-1))
        return torch.stack(out, -1)

    def fused(self) -> "FusedHeads":
        """The batch-1 inference form of these heads as their weights are now (``FusedHeads``)."""
        return FusedHeads(self)


class FusedHeads:
    """``DraftHeads.propose`` folded for batch-1 inference: the same proposal in fewer operations.

    Head j's logits for target layer t are (x + g W2 + b2) H_t^T + c_t with g = gelu(x W1 + b1);
    the product is linear after the gelu, so it is x H_t^T + g (W2 H_t^T) + (b2 H_t^T + c_t). For
    every layer l the heads' tables of targets l + 1.., the folded W2 H^T and the biases (codes a
    layer cannot emit get -inf) are stacked over j, so n heads take one batched product for their
    gelu inputs and two for their logits, whatever n is. Logits equal ``DraftHeads``' up to float
    rounding (tested); a proposal's argmax can differ only at a near-tie, which costs a rejected
    proposal, never a wrong code: the main pass verifies every proposal. A snapshot of the weights.
    """

    def __init__(self, heads: DraftHeads):
        c = heads.config
        J, L = c.offsets, c.num_layers
        self.config = c
        with torch.no_grad():
            self.code_emb, self.offsets = heads.code_emb.weight.detach().clone(), heads.offsets.clone()
            self.up_w, self.up_b = heads.up_w.detach().clone(), heads.up_b.detach()[:, None].clone()  # [J, d, w], [J, 1, w]
            # per layer l: head j's target l + j + 1 (layers past L - 1 are never asked for; zero rows)
            self.table, self.folded, self.bias = [], [], []
            for l in range(L):
                table = heads.head_w.new_zeros(J, c.d_model, heads.vocab)
                folded = heads.head_w.new_zeros(J, c.hidden, heads.vocab)
                bias = heads.head_w.new_full((J, 1, heads.vocab), float("-inf"))
                for j in range(J):
                    t = l + j + 1
                    if t >= L:
                        break
                    h = heads.head_w[j, t].T                               # [d, vocab]
                    table[j], folded[j] = h, heads.down_w[j] @ h
                    bias[j, 0] = (heads.down_b[j] @ h + heads.head_b[j, t]).masked_fill(heads.invalid[t], float("-inf"))
                self.table.append(table)
                self.folded.append(folded)
                self.bias.append(bias)

    def propose(self, hidden: torch.Tensor, code: torch.Tensor, layer: int, n: int) -> torch.Tensor:
        """Same as ``DraftHeads.propose``: hidden [B, T', d], codes [B, T'] -> codes [B, T', n]."""
        _check_proposal(self.config, layer, n)
        B, T = code.shape
        x = (hidden + self.code_emb[self.offsets[layer] + code]).reshape(1, B * T, -1).expand(n, -1, -1)
        g = F.gelu(torch.baddbmm(self.up_b[:n], x, self.up_w[:n]))                   # [n, B*T', w]
        logits = torch.baddbmm(torch.baddbmm(self.bias[layer][:n], x, self.table[layer][:n]), g,
                               self.folded[layer][:n])                               # [n, B*T', vocab]
        return logits.argmax(-1).T.reshape(B, T, n)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(fmt: str, model: nn.Module, path: str, provenance: dict, **extra) -> None:
    """Write ``model`` (its config dataclass and weights) under format tag ``fmt`` with its
    provenance and ``extra`` entries (hashes of the files it depends on), atomically."""
    save_torch({"format": fmt, "version": CHECKPOINT_VERSION, "config": asdict(model.config),
                  "state_dict": model.state_dict(), "provenance": provenance, **extra}, path)


def save_policy(model: TokenPolicy, path: str, tokenizer_sha256: str, provenance: dict) -> None:
    _save_checkpoint(POLICY_FORMAT, model, path, provenance, tokenizer_sha256=tokenizer_sha256)


def save_draft(model: DraftModel, path: str, policy_sha256: str, num_tasks: int,
               provenance: dict) -> None:
    _save_checkpoint(DRAFT_FORMAT, model, path, provenance, policy_sha256=policy_sha256, num_tasks=num_tasks)


def save_stop(model: StopModel, path: str, policy_sha256: str, provenance: dict) -> None:
    _save_checkpoint(STOP_FORMAT, model, path, provenance, policy_sha256=policy_sha256)


def save_heads(model: DraftHeads, path: str, policy_sha256: str, provenance: dict) -> None:
    _save_checkpoint(HEADS_FORMAT, model, path, provenance, policy_sha256=policy_sha256)


def _load_checkpoint(path: str, fmt: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        # weights_only: a checkpoint is tensors and plain values; unpickling arbitrary objects
        # from a file someone hands you would run their code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path!r} is not a readable checkpoint: it holds objects other than tensors and plain "
                         "values, and loading them could run code; refused") from None
    except Exception as exc:  # truncated or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path!r} is not a {fmt} checkpoint (format tag: {found!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path!r} has {fmt} version {ckpt.get('version')!r}; "
                         f"this code reads version {CHECKPOINT_VERSION}")
    return ckpt


def _refuse_other(ckpt: dict, path: str, what: str, key: str, other: str, other_path: str | None) -> None:
    """Refuse ``other_path`` when its sha256 is not the one ``path`` (a ``what``) recorded under
    ``key`` for the ``other`` it was trained with."""
    if other_path is not None:
        got = file_sha256(other_path)
        if got != ckpt[key]:
            raise ValueError(f"{what} {path!r} was trained with a different {other} than {other_path!r} "
                             f"(sha256 {ckpt[key][:12]}... vs {got[:12]}...)")


def _build(cls, config_cls, ckpt: dict, path: str, *args) -> nn.Module:
    """The model from the checkpoint's config and weights (strict); a config this code does not
    know, weights of another shape, or weights that are not finite are errors naming the file."""
    try:
        config = config_cls(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r}: its config does not fit this code's {config_cls.__name__} ({exc})") from None
    model = cls(config, *args)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: weights do not match the stored config: {exc}") from exc
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path!r}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}): a diverged "
                         "or corrupted training run")
    return model.eval()


def load_policy(path: str, tokenizer_path: str | None = None) -> tuple[TokenPolicy, dict]:
    """Rebuild a main policy from its file alone (eval mode). With ``tokenizer_path``, refuse a
    tokenizer other than the one the policy was trained with."""
    ckpt = _load_checkpoint(path, POLICY_FORMAT)
    _refuse_other(ckpt, path, "policy", "tokenizer_sha256", "tokenizer", tokenizer_path)
    return _build(TokenPolicy, PolicyConfig, ckpt, path), ckpt


def load_draft(path: str, policy_path: str | None = None) -> tuple[DraftModel, dict]:
    """Rebuild a draft model (eval mode); with ``policy_path``, refuse a different main policy."""
    ckpt = _load_checkpoint(path, DRAFT_FORMAT)
    _refuse_other(ckpt, path, "draft", "policy_sha256", "main policy", policy_path)
    return _build(DraftModel, DraftConfig, ckpt, path, ckpt["num_tasks"]), ckpt


def load_stop(path: str, policy_path: str | None = None) -> tuple[StopModel, dict]:
    """Rebuild a learned stop model (eval mode); with ``policy_path``, refuse a different main
    policy (its features and gaps are that policy's)."""
    ckpt = _load_checkpoint(path, STOP_FORMAT)
    _refuse_other(ckpt, path, "stop model", "policy_sha256", "main policy", policy_path)
    return _build(StopModel, StopConfig, ckpt, path), ckpt


def load_heads(path: str, policy_path: str | None = None) -> tuple[DraftHeads, dict]:
    """Rebuild self-drafting heads (eval mode); with ``policy_path``, refuse a different main
    policy (they read that policy's hidden states)."""
    ckpt = _load_checkpoint(path, HEADS_FORMAT)
    _refuse_other(ckpt, path, "self-drafting heads", "policy_sha256", "main policy", policy_path)
    return _build(DraftHeads, HeadsConfig, ckpt, path), ckpt
