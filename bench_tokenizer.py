"""Tokenizer benchmark: speed and reconstruction error of our RVQ / RFSQ against
vector-quantize-pytorch's ResidualVQ / ResidualFSQ in the same configuration, and FAST.

    python bench_tokenizer.py --data data/spatial_t0.hdf5 --json runs/bench.json
    python bench_tokenizer.py --synthetic 60 --steps 300     # quick run on synthetic chunks

Same configuration: every torch tokenizer is our RVQTokenizer's normalizer, encoder and
decoder (same dims, latent steps, layers, codebook size / FSQ levels) around a residual
quantizer, ours or the peer's; all four are trained by the same loop (Adam, same lr, same
batches from the same seed, same number of steps, one-cycle lr) on the training episodes, and measured on
held-out episodes (split by episode). The peers use their own EMA / k-means / dead-code
machinery with our decay, commitment weight and dead-code threshold, and quantize dropout
(so that, like ours, every prefix of layers decodes). ``rvq_direct`` is our RVQ without an
encoder (``--encoder none`` of train_rvq_tokenizer.py: the same layers, latent steps and
codebook size on the normalized chunk itself), fit by residual k-means on the same training
chunks; its ``train_seconds`` is that fit.

Measured on this CPU (torch threads: --threads): encode and decode throughput at batch
--batch (chunks/s, median over repeats; `chunks_per_s` is the encode+decode round trip),
batch-1 encode+decode latency and batch-1 decode alone, what a policy pays at run time (median
µs; every method's batch-1 calls are timed at the end, in turns of a few calls per method,
round after round, so that all see the same machine load), and full-depth reconstruction MSE of normalized
actions. Encode starts from raw actions and decode ends in raw actions for every method
(normalization included). FAST (scale --fast_scale, BPE on the training chunks) is timed
the same way; it runs in numpy/Python on one core.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from cli import arg
from compression_baselines import FASTTokenizer
from demos import Episode, chunk_actions, load_episodes, split_by_episode, validation_count
from fileio import check_outputs
from rvq_tokenizer import DIRECT_KMEANS_ITERS, RVQConfig, RVQTokenizer
from synthetic_data import synthetic_episodes
from timing import interleaved_median_seconds, median_seconds

log = logging.getLogger("bench_tokenizer")

# Bars of the tokenizer benchmark (issue 4).
MSE_RATIO_BAR = 1.1          # our MSE <= 1.1x vector-quantize-pytorch's
THROUGHPUT_RATIO_BAR = 1.5   # our encode+decode throughput >= 1.5x theirs
LATENCY_BAR_US = 1000.0      # batch-1 encode+decode median <= 1 ms
WARMUP_FRACTION = 0.05       # of the training steps, the one-cycle schedule's warm-up
# vector-quantize-pytorch's FSQ materializes its whole implicit codebook ([prod(levels), C]
# floats per layer) and computes indices in float32 (exact only below 2**24); beyond this many
# codes it runs out of memory or mis-decodes, so the peer is skipped.
VQPYTORCH_FSQ_MAX_CODES = 2 ** 20


# rvq_direct: our RVQ without an encoder (RVQConfig.encoder "none"), fit by residual k-means on
# the same training chunks instead of by the training loop
METHODS = ("rvq", "rfsq", "rvq_direct", "vqpytorch_rvq", "vqpytorch_rfsq", "fast")


@dataclass
class BenchArgs:
    # data
    data: list[str] | None = arg(None, "demo files (data/demo_*/actions) or LeRobot folders", nargs="+",
                                 metavar="PATH")
    synthetic: int = arg(0, "use N synthetic episodes instead of --data")
    val_fraction: float = arg(0.2, "share of episodes held out")
    chunk_size: int = arg(10, "steps per chunk")
    # configuration shared by every torch tokenizer
    num_layers: int = arg(8, "residual layers")
    codebook_size: int = arg(256, "codes per RVQ layer")
    latent_steps: int = arg(RVQConfig.latent_steps, "latent vectors per chunk")
    hidden_dim: int = arg(64, "encoder / decoder width")
    fsq_levels: list[int] = arg(None, "RFSQ levels per latent dimension", factory=lambda: list(RVQConfig().fsq_levels),
                                nargs="+")
    # training (identical for every method)
    steps: int = arg(3000, "training steps of every method")
    batch_size: int = arg(64, "chunks per training step")
    lr: float = arg(1e-3, "peak learning rate (one-cycle)")
    seed: int = cli.seed_arg()
    # timing
    batch: int = arg(1024, "batch size of the throughput measurement")
    repeats: int = arg(20, "timed repeats at --batch")
    latency_repeats: int = arg(300, "timed batch-1 calls of each kind per method (round trip, decode alone)")
    threads: int = cli.threads_arg(1)
    device: str = cli.device_arg()
    fast_scale: float = arg(10.0, "FAST: DCT coefficient scale")
    methods: list[str] = arg(None, "methods to measure", factory=lambda: list(METHODS), nargs="+",
                             choices=list(METHODS))
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.device = str(cli.resolve_device(self.device))
        cli.require(bool(self.data) != bool(self.synthetic), "give exactly one of --data PATH... or --synthetic N")
        cli.require_counts(self, "chunk_size", "num_layers", "codebook_size", "latent_steps", "hidden_dim", "batch_size",
                     "batch", "repeats", "latency_repeats", "threads")
        cli.require(self.synthetic >= 0, f"--synthetic must be >= 0, got {self.synthetic}")
        cli.require(0 < self.lr <= 1, f"--lr must be in (0, 1], got {self.lr}")
        cli.require(self.steps * WARMUP_FRACTION > 1,
                    f"--steps must be more than {int(1 / WARMUP_FRACTION)} (the one-cycle schedule warms up over "
                    f"{WARMUP_FRACTION:.0%} of them), got {self.steps}")


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(BenchArgs, "Benchmark our RVQ / RFSQ against vector-quantize-pytorch's and FAST: "
                                     "speed and reconstruction error in the same configuration (phase 1).")


class PeerTokenizer(nn.Module):
    """vector-quantize-pytorch's ResidualVQ or ResidualFSQ inside our normalizer, encoder and
    decoder (taken from an RVQTokenizer of the same config). actions [B, T, D] <-> codes [B, T', L]."""

    def __init__(self, config: RVQConfig, kind: str, dead_code_threshold: float):
        super().__init__()
        from vector_quantize_pytorch import ResidualFSQ, ResidualVQ

        self.config = c = config
        base = RVQTokenizer(config)
        self.normalizer, self.encoder, self.decoder = base.normalizer, base.encoder, base.decoder
        if kind == "rvq":
            self.quantizer = ResidualVQ(dim=c.quantizer_dim, num_quantizers=c.num_layers,
                                        codebook_size=c.codebook_size, decay=c.ema_decay,
                                        commitment_weight=c.commitment_weight, kmeans_init=True,
                                        kmeans_iters=10, threshold_ema_dead_code=dead_code_threshold,
                                        quantize_dropout=c.num_layers > 1)
        elif kind == "rfsq":
            self.quantizer = ResidualFSQ(levels=list(c.fsq_levels), num_quantizers=c.num_layers,
                                         dim=c.quantizer_dim, quantize_dropout=c.num_layers > 1)
        else:
            raise ValueError(f"unknown peer quantizer {kind!r} (rvq | rfsq)")
        self.kind = kind

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] normalized -> z [B, T', C]."""
        return self.encoder(x.flatten(1)).view(x.shape[0], self.config.latent_steps, -1)

    def _decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, T', C] -> [B, T, D] normalized."""
        c = self.config
        return self.decoder(latent.flatten(1)).view(-1, c.chunk_size, c.action_dim)

    def loss(self, actions: torch.Tensor) -> torch.Tensor:
        """Training loss on raw actions [B, T, D]: reconstruction MSE + the peer's commitment loss."""
        x = self.normalizer.normalize(actions)
        out = self.quantizer(self._latent(x))
        commit = out[2].sum() if self.kind == "rvq" else x.new_zeros(())
        return F.mse_loss(self._decode_latent(out[0]), x) + commit

    @torch.no_grad()
    def encode(self, actions) -> torch.Tensor:
        x = self.normalizer.normalize(torch.as_tensor(actions, dtype=torch.float32))
        return self.quantizer(self._latent(x))[1]

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        return self.normalizer.denormalize(self._decode_latent(self.quantizer.get_output_from_indices(codes)))


def load_chunks(args) -> tuple[np.ndarray, np.ndarray, dict]:
    """Raw train / held-out chunks [M, T, D], split by episode."""
    if args.data:
        episodes = load_episodes(args.data)
        train_eps, val_eps = split_by_episode(episodes, args.val_fraction, seed=args.seed)
        train_a, val_a = [e.actions for e in train_eps], [e.actions for e in val_eps]
        info = {"source": "files", "files": list(args.data)}
    else:
        eps = synthetic_episodes(args.synthetic, seed=args.seed)
        n_val = validation_count(len(eps), args.val_fraction)
        train_a, val_a = eps[n_val:], eps[:n_val]
        info = {"source": "synthetic", "episodes": args.synthetic}
    cut = lambda eps: chunk_actions([Episode(a, {}, True, "", 0, "", -1, -1) for a in eps], args.chunk_size)
    train, val = cut(train_a), cut(val_a)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"not enough chunks of {args.chunk_size} steps (train {len(train)}, held-out {len(val)})")
    info.update(train_episodes=len(train_a), val_episodes=len(val_a), train_chunks=len(train), val_chunks=len(val))
    return train, val, info


def train(model: nn.Module, loss_fn, train_chunks: torch.Tensor, args, name: str) -> float:
    """The one training loop for every method: Adam with train_rvq_tokenizer.py's one-cycle
    schedule, the same batches in the same order. Returns seconds."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=WARMUP_FRACTION)
    model.train()
    t0 = time.perf_counter()
    for step in cli.progress(range(args.steps), desc=f"train {name}", unit="step"):
        idx = torch.randint(len(train_chunks), (args.batch_size,), generator=gen)
        loss = loss_fn(train_chunks[idx])
        if not torch.isfinite(loss):
            raise ValueError(f"{name}: training diverged at step {step} (loss {float(loss)}); lower --lr, or check "
                             "the actions for extreme values")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def build_torch_method(name: str, config: RVQConfig, train_raw: torch.Tensor, args):
    """A trained tokenizer exposing encode(raw) -> codes and decode(codes) -> raw."""
    quantizer = "rfsq" if name.endswith("rfsq") else "rvq"
    cfg = RVQConfig(**{**config.__dict__, "quantizer": quantizer})
    torch.manual_seed(args.seed)  # the initial weights and codebooks: the same in every run
    if name == "rvq_direct":
        # its own defaults for the staged quantizer (cell scales, beam search)
        model = RVQTokenizer(RVQConfig(**{**cfg.__dict__, "encoder": "none", "cell_scale": None,
                                          "beam_width": None}))
        t0 = time.perf_counter()
        model.normalizer.fit(train_raw)
        model.init_codebooks(train_raw, iters=DIRECT_KMEANS_ITERS)
        return model.to(args.device).eval(), time.perf_counter() - t0
    if name.startswith("vqpytorch"):
        # our dead-code rule (EMA usage < fraction x mean usage) as an absolute count per batch
        threshold = cfg.dead_code_fraction * args.batch_size * cfg.latent_steps / cfg.codebook_size
        model = PeerTokenizer(cfg, quantizer, threshold)
        model.normalizer.fit(train_raw)
        model = model.to(args.device)
        seconds = train(model, model.loss, train_raw.to(args.device), args, name)
    else:
        model = RVQTokenizer(cfg)
        model.normalizer.fit(train_raw)
        model.init_codebooks(train_raw)
        model = model.to(args.device)
        seconds = train(model, lambda b: model(b).loss, train_raw.to(args.device), args, name)
    return model, seconds


LATENCY_KEYS = ("batch1_latency_us", "batch1_decode_us")
# batch-1 calls timed per turn: a single call after another method's runs meets cold caches
LATENCY_BLOCK = 25


def measure(encode, decode, batch, single, args) -> tuple[dict, dict]:
    """Throughput of encode(raw) / decode(codes) at batch --batch, and the batch-1 calls whose
    latency ``main`` times later, in turn with every other method's: the round trip, and
    decode alone (what a policy pays at run time)."""
    codes = encode(batch)
    t_enc = median_seconds(lambda: encode(batch), args.repeats)
    t_dec = median_seconds(lambda: decode(codes), args.repeats)
    single_codes = encode(single)
    n = len(batch)
    return ({"chunks_per_s": n / (t_enc + t_dec), "encode_chunks_per_s": n / t_enc,
             "decode_chunks_per_s": n / t_dec},
            {"batch1_latency_us": lambda: decode(encode(single)),
             "batch1_decode_us": lambda: decode(single_codes)})


def time_batch1(calls: dict, repeats: int) -> dict:
    """{method: {key: median µs}} of every method's batch-1 calls, timed in turns of
    ``LATENCY_BLOCK`` calls (after one untimed call), method after method, round after round:
    on a machine whose load drifts, timing all of one method's calls and then another's let
    the drift decide their order."""
    keys = [(name, key) for name in calls for key in LATENCY_KEYS]
    with torch.inference_mode():
        seconds = interleaved_median_seconds([calls[name][key] for name, key in keys], repeats, warmup=20,
                                             block=LATENCY_BLOCK)
    out = {name: {} for name in calls}
    for (name, key), t in zip(keys, seconds):
        out[name][key] = 1e6 * t
    return out


def bench_torch(model, val_raw: torch.Tensor, batch: torch.Tensor, args) -> tuple[dict, dict]:
    val_raw, batch = val_raw.to(args.device), batch.to(args.device)

    def synced(fn):  # a wall time on CUDA needs the queued kernels finished
        return lambda x: (lambda out: (cli.synchronize(batch.device), out)[1])(fn(x))

    with torch.inference_mode():
        recon = model.decode(model.encode(val_raw))
        norm = model.normalizer.normalize
        mse = float(F.mse_loss(norm(recon), norm(val_raw)))
        numbers, calls = measure(synced(model.encode), synced(model.decode), batch, batch[:1], args)
        return {"mse": mse, **numbers}, calls


def bench_fast(train_raw: np.ndarray, val_raw: np.ndarray, batch: np.ndarray, args) -> tuple[dict, dict]:
    """FAST on the same normalization (q01/q99 of the training chunks, as our tokenizer's)."""
    from rvq_tokenizer import ActionNormalizer

    normalizer = ActionNormalizer(train_raw.shape[-1]).fit(train_raw)
    low, high = normalizer.low.numpy().astype(np.float64), normalizer.high.numpy().astype(np.float64)
    norm = lambda a: 2 * (a - low) / (high - low) - 1
    denorm = lambda x: (x + 1) / 2 * (high - low) + low
    fast = FASTTokenizer(scale=args.fast_scale).fit(norm(train_raw))
    tokens = fast.encode(norm(val_raw))
    recon, failed = fast.decode(tokens)
    if failed.any():
        raise RuntimeError(f"FAST failed to decode {failed.sum()} of its own encodings")
    encode = lambda a: fast.encode(norm(a))
    decode = lambda t: denorm(fast.decode(t)[0])
    numbers, calls = measure(encode, decode, batch, batch[:1], args)
    return {"mse": float(np.mean((recon - norm(val_raw)) ** 2)),
            "tokens_per_chunk": fast.budget(tokens).tokens_per_chunk, **numbers}, calls


def bars(methods: dict) -> dict:
    """The benchmark's bars from the measured numbers (None where a method was not run)."""
    out = {}
    for ours, theirs in (("rvq", "vqpytorch_rvq"), ("rfsq", "vqpytorch_rfsq")):
        if ours in methods and theirs in methods:
            a, b = methods[ours], methods[theirs]
            out[f"{ours}_mse_ratio"] = a["mse"] / b["mse"]
            out[f"{ours}_mse_ok"] = a["mse"] <= MSE_RATIO_BAR * b["mse"]
            out[f"{ours}_throughput_ratio"] = a["chunks_per_s"] / b["chunks_per_s"]
            out[f"{ours}_throughput_ok"] = out[f"{ours}_throughput_ratio"] >= THROUGHPUT_RATIO_BAR
    for ours in ("rvq", "rfsq", "rvq_direct"):
        if ours in methods:
            out[f"{ours}_batch1_latency_ok"] = methods[ours]["batch1_latency_us"] <= LATENCY_BAR_US
    return out


def print_table(r: dict) -> None:
    s = r["settings"]
    print(f"\nTokenizer benchmark ({s['threads']} thread(s), batch {s['batch']}, {s['steps']} training steps, "
          f"{r['data']['val_chunks']} held-out chunks)")
    print(f"{'method':>15} {'rt chunks/s':>12} {'enc chunks/s':>13} {'dec chunks/s':>13} {'b1 rt µs':>9} "
          f"{'b1 dec µs':>10} {'MSE':>10}")
    for name, m in r["methods"].items():
        print(f"{name:>15} {m['chunks_per_s']:>12.0f} {m['encode_chunks_per_s']:>13.0f} {m['decode_chunks_per_s']:>13.0f} "
              f"{m['batch1_latency_us']:>9.0f} {m['batch1_decode_us']:>10.0f} {m['mse']:>10.6f}")
    for name, reason in r["skipped"].items():
        print(f"{name:>15} skipped: {reason}")
    for k, v in r["bars"].items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")

def main(args: BenchArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--json": args.json}, {"--data": args.data})
    torch.set_num_threads(args.threads)
    train_np, val_np, data = load_chunks(args)
    config = RVQConfig(action_dim=train_np.shape[-1], chunk_size=args.chunk_size, latent_steps=args.latent_steps,
                       hidden_dim=args.hidden_dim, num_layers=args.num_layers, codebook_size=args.codebook_size,
                       fsq_levels=tuple(args.fsq_levels))
    rng = np.random.default_rng(args.seed)
    batch_np = val_np[rng.integers(len(val_np), size=args.batch)]
    train_t, val_t, batch_t = (torch.as_tensor(a) for a in (train_np, val_np, batch_np))
    methods, skipped, calls = {}, {}, {}
    codes = math.prod(config.fsq_levels)
    for name in args.methods:
        if name == "vqpytorch_rfsq" and codes > VQPYTORCH_FSQ_MAX_CODES:
            skipped[name] = (f"fsq_levels {list(config.fsq_levels)} give {codes} codes per layer; "
                             f"vector-quantize-pytorch's FSQ stores all of them (> {VQPYTORCH_FSQ_MAX_CODES})")
            log.warning("skipping %s: %s", name, skipped[name])
            continue
        if name == "fast":
            methods[name], calls[name] = bench_fast(train_np, val_np, batch_np, args)
        else:
            model, seconds = build_torch_method(name, config, train_t, args)
            methods[name], calls[name] = bench_torch(model, val_t, batch_t, args)
            methods[name]["train_seconds"] = seconds
        if not math.isfinite(methods[name]["mse"]):
            raise ValueError(f"{name}: held-out MSE is {methods[name]['mse']}; check the actions for extreme values")
        log.info("%s: %s", name, {k: round(v, 6) for k, v in methods[name].items()})
    log.info("batch-1 latencies: %d calls of each method, in turns of %d", args.latency_repeats, LATENCY_BLOCK)
    for name, numbers in time_batch1(calls, args.latency_repeats).items():
        methods[name].update(numbers)
    result = {"data": data, "config": {**config.__dict__, "fsq_levels": list(config.fsq_levels)},
              "settings": {"threads": args.threads, "batch": args.batch, "steps": args.steps,
                           "batch_size": args.batch_size, "lr": args.lr, "fast_scale": args.fast_scale},
              "methods": methods, "skipped": skipped, "bars": bars(methods)}
    print_table(result)
    cli.save_json(args.json, result, log)
    return result



if __name__ == "__main__":
    cli.run(main, build_parser())
