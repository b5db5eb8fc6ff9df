"""What one main-policy pass costs on this CPU, against the new tokens it carries and the batch rows.

Speculation trades passes for tokens: a verify pass carries the proposed blocks, a token tree
carries several candidates per layer. Whether that pays depends on how a pass's cost grows
with the tokens it carries (the sequence dimension) and with batch rows, which this measures
with the engine's own pieces: a pass appends its tokens to a key/value cache that already
holds the ctx and code block 0 (what the engine's second pass sees), runs the transformer
blocks under an explicit mask (``TokenPolicy.run_masked``, as ``extend`` and ``extend_tree``
do), the final norm and one layer's head. Each row is the median over ``repeats`` passes, the
rows timed in turn so that a change of load on a shared machine touches them all.

Beside each time: the pass's matmul FLOPs (``pass_flops``) and the time they take at the
matmul rate this CPU reaches in the same run (the fastest of a few large torch matmuls,
``matmul_flops_per_second``):
how far a pass is from being bound by arithmetic rather than by per-operation overhead.

Used by ``bench_decoding.py --pass_costs``.
"""

from __future__ import annotations

import time

import torch

from policy_models import PolicyConfig, TokenPolicy
from timing import interleaved_median_seconds

TOKENS = (1, 2, 4, 8, 16, 32, 64)
BATCH_ROWS = (1, 2, 4, 8)
# the shape of the round-3 policy's tokenizer (RESULTS.md, section 4); the other sizes are
# PolicyConfig's defaults. obs_dim only shapes the ctx encoder, which the timed passes do not run.
RANDOM_POLICY_SHAPE = {"latent_steps": 3, "num_layers": 8, "codebook_size": 16, "obs_dim": 64}
# a matmul this large runs at the CPU's sustained rate, not at the cost of calling it
MATMUL_SIZE = 1024


def random_policy(latent_steps: int, num_layers: int, codebook_size: int, obs_dim: int, seed: int = 0) -> TokenPolicy:
    """A randomly initialised main policy of the default architecture (eval mode)."""
    torch.manual_seed(seed)
    config = PolicyConfig(obs_dim=obs_dim, instructions=("task",), latent_steps=latent_steps,
                          num_layers=num_layers, codebook_sizes=(codebook_size,) * num_layers)
    return TokenPolicy(config).eval()


def describe(policy: TokenPolicy) -> dict:
    c = policy.config
    return {"d_model": c.d_model, "n_heads": c.n_heads, "n_blocks": c.n_blocks, "obs_tokens": c.obs_tokens,
            "latent_steps": c.latent_steps, "num_layers": c.num_layers, "vocab": c.vocab}


def pass_flops(config: PolicyConfig, new_tokens: int, cached: int, batch: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one pass appending ``new_tokens`` per row to ``cached``
    tokens: per token and transformer block the qkv (3 d^2), output (d^2) and MLP (8 d^2)
    projections and the attention scores and weighted values over all S = cached + new keys
    (2 d S; the masked ones are computed too); per token one layer's head (d * vocab)."""
    d, S = config.d_model, cached + new_tokens
    per_token = config.n_blocks * (12 * d * d + 2 * d * S) + d * config.vocab
    return 2 * batch * new_tokens * per_token


def matmul_flops_per_second(size: int = MATMUL_SIZE, repeats: int = 10) -> float:
    """FLOP/s of a [size, size] @ [size, size] float32 torch matmul on the current thread setting,
    its fastest of ``repeats`` calls: the rate the hardware reaches; other work on a shared
    machine only slows a call down."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    for _ in range(2):
        a @ b
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return 2 * size ** 3 / min(seconds)


class CachedPass:
    """One pass of ``new_tokens`` tokens per row (codes of layer 0, read by block 1) over a cache
    of ``batch`` rows holding the ctx and code block 0; calling it runs the pass and returns the
    logits [batch, new_tokens, vocab], leaving the cache as it was."""

    def __init__(self, policy: TokenPolicy, new_tokens: int, batch: int, seed: int = 0):
        c = policy.config
        gen = torch.Generator().manual_seed(seed)
        self.policy = policy
        with torch.no_grad():
            obs = torch.randn(batch, c.obs_dim, generator=gen)
            ctx = policy.embed_obs(obs, torch.zeros(batch, dtype=torch.long))
            self.cache = policy.new_cache()
            policy.extend(self.cache, 0, 1, None, ctx)
        self.keys, self.values = list(self.cache.k), list(self.cache.v)
        self.cached = self.cache.length
        self.codes = torch.randint(0, c.codebook_sizes[0], (batch, new_tokens), generator=gen)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        p = self.policy
        self.cache.k, self.cache.v = list(self.keys), list(self.values)  # the pass replaces the lists' entries
        n = self.codes.shape[1]
        x = p.code_emb(self.codes + p.offsets[0]) + p.pos_emb[:, torch.arange(n) % p.config.latent_steps] + p.layer_emb[1]
        mask = torch.ones(n, self.cached + n, dtype=torch.bool)
        h = p.run_masked(x, mask, self.cache)
        return p.ln_f(h) @ p.head_w[1].T + p.head_b[1]


def pass_cost_rows(policy: TokenPolicy, tokens=TOKENS, batch_rows=BATCH_ROWS, repeats: int = 200,
                   warmup: int = 20) -> tuple[list[dict], float]:
    """(rows, matmul FLOP/s): one row per pass shape, the tokens at batch 1, then the batch rows
    carrying one code block (T' tokens) each: batch, new_tokens, cached_tokens, ms_median, flops,
    flop_bound_ms (the FLOPs at the measured matmul rate), ms_per_row_token, vs_one_token (time
    over that of the one-token pass at batch 1)."""
    T = policy.config.latent_steps
    shapes = [(1, n) for n in tokens] + [(b, T) for b in batch_rows if b != 1 or T not in tokens]
    passes = [CachedPass(policy, n, b) for b, n in shapes]
    seconds = interleaved_median_seconds(passes, repeats, warmup)
    rate = matmul_flops_per_second()
    rows = []
    for (b, n), p, s in zip(shapes, passes, seconds):
        flops = pass_flops(policy.config, n, p.cached, b)
        rows.append({"batch": b, "new_tokens": n, "cached_tokens": p.cached, "ms_median": 1e3 * s,
                     "flops": flops, "flop_bound_ms": 1e3 * flops / rate, "ms_per_row_token": 1e3 * s / (b * n)})
    base = next((r["ms_median"] for r in rows if (r["batch"], r["new_tokens"]) == (1, 1)), rows[0]["ms_median"])
    for r in rows:
        r["vs_one_token"] = r["ms_median"] / base
    return sorted(rows, key=lambda r: (r["batch"], r["new_tokens"])), rate


def print_pass_costs(result: dict) -> None:
    print(f"\nmodel timed: {result['model']}")
    print(f"one main pass, {result['threads']} thread(s), median of {result['repeats']} passes; matmul rate "
          f"{result['matmul_gflops']:.1f} GFLOP/s (fastest {MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul, same run)")
    print(f"{'batch':>5} | {'new tokens':>10} | {'cached':>6} | {'ms':>7} | {'vs 1 token':>10} | "
          f"{'ms/row-token':>12} | {'MFLOP':>7} | {'FLOP-bound ms':>13} | {'x bound':>7}")
    for r in result["rows"]:
        print(f"{r['batch']:5d} | {r['new_tokens']:10d} | {r['cached_tokens']:6d} | {r['ms_median']:7.3f} | "
              f"{r['vs_one_token']:9.2f}x | {r['ms_per_row_token']:12.4f} | {r['flops'] / 1e6:7.2f} | "
              f"{r['flop_bound_ms']:13.4f} | {r['ms_median'] / r['flop_bound_ms']:6.1f}x")
