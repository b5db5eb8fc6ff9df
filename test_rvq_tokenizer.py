"""Readable self-check of the residual tokenizer, without a simulator.

    python test_rvq_tokenizer.py            # prints every check; exit code 1 if any fails

1. vector quantizer: k-means init, EMA codebook (a buffer, not a parameter), dead codes
2. residual quantizers: each RVQ / RFSQ layer lowers the error, deep RFSQ layers stay alive
3. tokenizer basics: shapes, decode(encode(x)) == eval forward, bad codes, save / reload
4. layers 1..L on realistic smooth actions: a short training on synthetic pick-and-place
   episodes, then the error of every prefix on held-out episodes
5. the same for RVQ without an encoder (whole-chunk, then step-group layers, fit by
   residual k-means)
The pytest suite (tests/test_rvq_tokenizer_unit.py) covers the same ground and more.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

import rvq_tokenizer as rt
from rvq_tokenizer import fit_residual_kmeans, train_tokenizer
from demos import chunk_actions
from synthetic_data import synthetic_episodes

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, bool(ok), detail))
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f"  ({detail})" if detail else ""))
    return bool(ok)


def vector_quantizer() -> None:
    print("\n1. Vector quantizer (EMA codebook, k-means init, dead codes)")
    torch.manual_seed(0)
    centres = torch.randn(16, 4) * 3
    x = centres[torch.randint(16, (4000,))] + 0.05 * torch.randn(4000, 4)
    vq = rt.VectorQuantizer(dim=4, codebook_size=16, decay=0.8)
    check("codebook is a buffer, invisible to the optimizer", list(vq.parameters()) == [])
    vq.kmeans_init(x)
    err = float(((x - vq.lookup(vq.quantize(x))) ** 2).mean())
    check("k-means init fits 16 clusters with 16 codes", err < 0.1 * float(x.var(0).sum()), f"MSE {err:.4f}")
    shifted = x + 0.5
    before = float(((shifted - vq.lookup(vq.quantize(shifted))) ** 2).mean())
    for _ in range(30):
        vq.update(shifted, vq.quantize(shifted))
    after = float(((shifted - vq.lookup(vq.quantize(shifted))) ** 2).mean())
    check("EMA updates follow data that moved", after < 0.2 * before, f"MSE {before:.4f} -> {after:.4f}")
    vq = rt.VectorQuantizer(dim=4, codebook_size=16, decay=0.5)
    vq.kmeans_init(x)
    far = torch.randn(256, 4) + 50.0  # all new data lands on one code; the others fall idle
    replaced = sum(vq.update(far, vq.quantize(far)) for _ in range(20))
    used = vq.quantize(far).unique().numel()
    check("dead codes are re-seeded from current inputs", replaced > 0 and used >= 8,
          f"{replaced} re-seeded, {used}/16 codes used on the new data")


def residual_quantizers() -> None:
    print("\n2. Residual quantizers (one residual loop for RVQ and RFSQ)")
    torch.manual_seed(0)
    z = torch.randn(4000, 1, 8)
    rvq = rt.ResidualQuantizer([rt.VectorQuantizer(8, 64) for _ in range(6)])
    residual = z.reshape(-1, 8)
    for layer in rvq.layers:  # k-means per layer on what the previous layers left
        layer.kmeans_init(residual)
        residual = residual - layer.lookup(layer.quantize(residual))
    out = rvq.eval()(z)
    errs = [float(((z - out.prefix_latents[l]) ** 2).mean()) for l in range(6)]
    check("RVQ: every layer lowers the latent error", all(b < a for a, b in zip(errs, errs[1:])),
          " ".join(f"{e:.3f}" for e in errs))
    check("RVQ: output equals the decoded codes", torch.equal(rvq.decode_codes(out.codes), out.quantized))
    layers = [rt.ScalarQuantizer((3,) * 8, l, layer_scale=1.75) for l in range(6)]
    zf = torch.rand(4000, 1, 8) * 1.8 - 0.9
    out = rt.ResidualQuantizer(layers).eval()(zf)
    errs = [float(((zf - out.prefix_latents[l]) ** 2).mean()) for l in range(6)]
    check("RFSQ: each layer divides the error by about 1.75^2",
          all(2.0 < a / b < 4.5 for a, b in zip(errs, errs[1:])), " ".join(f"{e:.1e}" for e in errs))
    outer = [float(((out.codes[..., l] % 3) != 1).float().mean()) for l in range(6)]
    check("RFSQ: deep layers still use the outer levels (not stuck in the middle)",
          min(outer) > 0.1, "outer-level share per layer " + " ".join(f"{s:.2f}" for s in outer))


def tokenizer_basics(model: rt.RVQTokenizer, x: torch.Tensor) -> None:
    c = model.config
    label = c.quantizer if c.encoder == "mlp" else f"{c.quantizer} without encoder"
    model.eval()
    codes = model.encode(x)
    check(f"{label}: encode gives integer codes [B, T', L]",
          codes.dtype == torch.long and tuple(codes.shape) == (len(x), c.latent_steps, c.num_layers),
          f"shape {tuple(codes.shape)}")
    check(f"{label}: decode(encode(x)) equals the eval forward exactly",
          torch.equal(model.decode(codes), model.denormalize(model(x).recon)))
    try:
        model.decode(torch.full((1, c.latent_steps, 1), model.layer_codebook_sizes()[0]))
        check(f"{label}: out-of-range code is refused", False)
    except ValueError as exc:
        check(f"{label}: out-of-range code is refused", "out of range" in str(exc), str(exc))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tok.pt")
        rt.save_tokenizer(model, path, {"args": {}, "seed": 0, "metrics": {}})
        loaded, _ = rt.load_tokenizer(path)
        same = all(torch.equal(loaded.decode(codes[..., :l]), model.decode(codes[..., :l]))
                   for l in range(1, c.num_layers + 1))
        check(f"{label}: save + reload decode every prefix identically", same)


def layers_on_smooth_actions(quantizer: str, epochs: int, encoder: str = "mlp") -> None:
    name = quantizer if encoder == "mlp" else f"{quantizer} without encoder"
    print(f"\n{'3-4' if encoder == 'mlp' else '5'}. {name.upper()} tokenizer on synthetic pick-and-place actions")
    torch.manual_seed(0)
    episodes = synthetic_episodes(24, seed=7)
    train, val = chunk_actions(episodes[4:], 10), chunk_actions(episodes[:4], 10)
    config = rt.RVQConfig(quantizer=quantizer, num_layers=6, encoder=encoder)
    if encoder == "none":
        model, _ = fit_residual_kmeans(config, train, val, iters=rt.DIRECT_KMEANS_ITERS)
    else:
        model, _ = train_tokenizer(config, train, val, epochs=epochs, batch_size=64, lr=2e-3, progress=False)
    x = torch.as_tensor(val)
    tokenizer_basics(model, x)
    mse = model.prefix_mse(x).tolist()
    usage = rt.code_usage(model.encode(x), model.layer_codebook_sizes())
    print(f"     {'layers':>6} {'bits':>6} {'held-out MSE':>12} {'perplexity':>10}")
    for l, (m, u) in enumerate(zip(mse, usage), 1):
        print(f"     {'1-' + str(l):>6} {model.bits_per_chunk(l):>6.0f} {m:>12.5f} {u['perplexity']:>10.1f}")
    variance = float(model.normalize(x).var(0).mean())
    check(f"{name}: layer 1 alone captures the coarse motion", mse[0] < 0.2 * variance,
          f"MSE {mse[0]:.4f} vs variance {variance:.4f}")
    check(f"{name}: error falls with every added layer", all(b < a for a, b in zip(mse, mse[1:])))
    check(f"{name}: no dead layer (perplexity > 8 in every layer)",
          min(u["perplexity"] for u in usage) > 8, "min perplexity %.1f" % min(u["perplexity"] for u in usage))


def main(args) -> dict:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    vector_quantizer()
    residual_quantizers()
    for q in ("rvq", "rfsq"):
        layers_on_smooth_actions(q, args.epochs)
    layers_on_smooth_actions("rvq", args.epochs, encoder="none")
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return {"passed": len(RESULTS) - len(failed), "failed": failed}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=8, help="training epochs for part 4")
    result = main(p.parse_args())
    sys.exit(1 if result["failed"] else 0)
