"""Unit tests of rvq_tokenizer.py, parametrized over RVQ and RFSQ (synthetic smooth actions,
no simulator). A short training run per quantizer is shared by the tests that need a model
that has learned something."""

import os

import numpy as np
import pytest
import torch

import rvq_tokenizer as rt
from demos import chunk_actions
from synthetic_data import synthetic_episodes
from rvq_tokenizer import train_tokenizer

QUANTIZERS = ["rvq", "rfsq"]
LAYERS = 4  # enough to see a hierarchy, small enough to train in seconds


def small_config(quantizer: str, **kw) -> rt.RVQConfig:
    base = dict(quantizer=quantizer, num_layers=LAYERS, hidden_dim=64, latent_steps=2,
                codebook_size=64, code_dim=8, fsq_levels=(3,) * 8, fsq_layer_scale=1.75)
    return rt.RVQConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data():
    """Train / held-out chunks [M, 10, 7] from different synthetic episodes."""
    episodes = synthetic_episodes(14, seed=3)
    return chunk_actions(episodes[2:], 10), chunk_actions(episodes[:2], 10)


@pytest.fixture(scope="module", params=QUANTIZERS)
def trained(request, data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add overhead
    torch.manual_seed(0)
    train, val = data
    model, history = train_tokenizer(small_config(request.param), train, val, epochs=6,
                                     batch_size=64, lr=2e-3, progress=False)
    yield model, history
    torch.set_num_threads(threads)


def untrained(quantizer: str, chunks: np.ndarray) -> rt.RVQTokenizer:
    model = rt.RVQTokenizer(small_config(quantizer))
    x = torch.as_tensor(chunks)
    model.normalizer.fit(x.reshape(-1, 7))
    model.init_codebooks(x)
    return model


# ----------------------------------------------------------------------------- API contract


def test_decode_of_encode_equals_eval_forward(trained, data):
    model, _ = trained
    x = torch.as_tensor(data[1])
    model.eval()
    forward = model.denormalize(model(x).recon)
    codes = model.encode(x)
    assert codes.dtype == torch.long and codes.shape == (len(x), 2, LAYERS)
    assert torch.equal(codes, model(x).codes)
    assert torch.equal(model.decode(codes), forward)


def test_every_prefix_decodes_and_error_falls_with_layers(trained, data):
    model, _ = trained
    x = torch.as_tensor(data[1])  # held-out episodes
    codes = model.encode(x)
    errors = []
    for l in range(1, LAYERS + 1):
        out = model.decode(codes[..., :l])
        assert out.shape == x.shape and torch.isfinite(out).all()
        errors.append(float(((model.normalize(out) - model.normalize(x)) ** 2).mean()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0], errors  # the later layers add real detail
    assert np.allclose(errors, model.prefix_mse(x).numpy(), rtol=1e-4)


def test_every_layer_is_used(trained, data):
    model, _ = trained
    usage = rt.code_usage(model.encode(torch.as_tensor(data[1])), model.layer_codebook_sizes())
    for u in usage:
        assert u["perplexity"] > 4, usage  # a dead layer has perplexity ~1


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_layer_passes_gradient_to_encoder_and_decoder(quantizer, data):
    model = untrained(quantizer, data[0])
    model.train()
    x = torch.as_tensor(data[0][:64])
    previous = None
    for l in range(1, LAYERS + 1):
        model.zero_grad()
        out = model(x, keep=torch.full((len(x),), l))
        out.loss.backward()
        for name, part in (("encoder", model.encoder), ("decoder", model.decoder)):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), (name, l)
            assert sum(float(g.abs().sum()) for g in grads) > 0, (name, l)
        if previous is not None:  # layer l changes the output: it is not skipped
            assert not torch.allclose(out.recon, previous)
        previous = out.recon.detach()


def test_save_and_reload_give_identical_outputs(trained, data, tmp_path):
    model, _ = trained
    path = str(tmp_path / "tok.pt")
    rt.save_tokenizer(model, path, {"args": {}, "seed": 0, "metrics": {"x": 1.0}})
    loaded, ckpt = rt.load_tokenizer(path)
    assert not loaded.training
    assert ckpt["format"] == rt.CHECKPOINT_FORMAT and ckpt["provenance"]["metrics"] == {"x": 1.0}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)
    x = torch.as_tensor(data[1])
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    for l in range(1, LAYERS + 1):
        torch.testing.assert_close(loaded.decode(codes[..., :l]), model.decode(codes[..., :l]),
                                   atol=0, rtol=0)
    assert not any(f.startswith(".tmp_") for f in os.listdir(tmp_path))  # atomic write cleaned up


# ----------------------------------------------------------------------------- components


def test_normalizer_maps_q01_q99_and_handles_constant_dims():
    rng = np.random.default_rng(0)
    a = np.stack([rng.uniform(-3, 5, 5000), np.full(5000, 0.7), rng.normal(0, 0.1, 5000)], 1)
    norm = rt.ActionNormalizer(3).fit(a)
    x = torch.as_tensor(a, dtype=torch.float32)
    n = norm.normalize(x)
    q = torch.quantile(n[:, [0, 2]], torch.tensor([0.01, 0.99]), dim=0)
    torch.testing.assert_close(q, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-3, rtol=0)
    assert torch.all(n[:, 1] == 0)  # the constant dimension maps to 0, not to inf / nan
    torch.testing.assert_close(norm.denormalize(n), x, atol=1e-5, rtol=0)
    assert {"low", "high", "fitted"} <= set(dict(norm.named_buffers()))


def test_vq_codebook_is_a_buffer_updated_by_ema_only():
    torch.manual_seed(0)
    vq = rt.VectorQuantizer(dim=4, codebook_size=8, decay=0.5)
    assert list(vq.parameters()) == []  # no optimizer can update it
    centres = torch.randn(8, 4) * 3
    x = centres.repeat(250, 1) + 0.01 * torch.randn(2000, 4)
    vq.codebook.copy_(centres + 0.3 * torch.randn(8, 4))  # every code near, not on, its cluster
    vq.embed_sum.copy_(vq.codebook)
    vq.cluster_size.fill_(1.0)
    vq.initialized.fill_(True)
    before = ((x - vq.lookup(vq.quantize(x))) ** 2).mean()
    for _ in range(20):
        vq.update(x, vq.quantize(x))
    after = ((x - vq.lookup(vq.quantize(x))) ** 2).mean()
    assert before > 0.01 and after < 1e-3, (before, after)  # EMA moved the codes onto the data


def test_vq_kmeans_init_fits_the_data():
    torch.manual_seed(0)
    vq = rt.VectorQuantizer(dim=2, codebook_size=16)
    x = torch.randn(4000, 2)
    vq.kmeans_init(x)
    err = float(((x - vq.lookup(vq.quantize(x))) ** 2).mean())
    assert bool(vq.initialized) and err < 0.2 * float(x.var(0).sum())  # 16 codes: ~10x less error
    assert vq.quantize(x).unique().numel() == 16


def test_vq_dead_codes_are_reseeded_from_current_inputs():
    torch.manual_seed(0)
    vq = rt.VectorQuantizer(dim=2, codebook_size=4, decay=0.5, dead_code_fraction=0.1)
    vq.kmeans_init(torch.randn(100, 2))
    x = torch.randn(64, 2) + 100.0  # the data moved far away: at most one code is used
    replaced = sum(vq.update(x, vq.quantize(x)) for _ in range(10))
    assert replaced >= 3
    assert (vq.codebook - 100).abs().max() < 10  # every code now lives near the data
    assert vq.quantize(x).unique().numel() >= 3


def test_rfsq_layers_form_a_uniform_grid_and_deep_layers_are_not_dead():
    levels = (4, 3)
    layers = [rt.ScalarQuantizer(levels, l) for l in range(3)]
    rq = rt.ResidualQuantizer(layers).eval()
    z = torch.rand(20000, 1, 2) * 2 - 1  # uniform latents in [-1, 1]
    out = rq(z)
    err = (out.quantized - z).abs()
    for d, n in enumerate(levels):  # 3 layers of n levels = a uniform grid of step 2 / n**3
        assert err[..., d].max() <= 1 / n ** 3 + 1e-6
    for l in range(3):  # every layer uses all 12 codes about equally
        counts = torch.bincount(out.codes[..., l].flatten(), minlength=12).float()
        assert counts.min() > 0.5 * counts.mean(), (l, counts)
    torch.testing.assert_close(rq.decode_codes(out.codes), out.quantized, atol=0, rtol=0)


def test_rfsq_with_a_gentle_scale_keeps_every_level_of_deep_layers_in_use():
    """s = 1.75 < 3 levels: each layer refines by ~1.75, and the outer levels stay in use in
    every layer (the earlier attempt's deep layers always picked the middle level)."""
    layers = [rt.ScalarQuantizer((3, 3), l, layer_scale=1.75) for l in range(8)]
    z = torch.rand(20000, 1, 2) * 1.8 - 0.9
    out = rt.ResidualQuantizer(layers).eval()(z)
    for l in range(8):
        digits = out.codes[..., l].flatten() % 3  # first dimension's level
        share = torch.bincount(digits, minlength=3).float() / digits.numel()
        assert share.min() > 0.05, (l, share)  # no layer collapses onto the middle level
    errs = [float(((z - out.prefix_latents[l]) ** 2).mean()) for l in range(8)]
    for a, b in zip(errs, errs[1:]):  # error shrinks by about 1.75**2 = 3 per layer
        assert 2.0 < a / b < 4.5, errs


def test_quantizer_dropout_keeps_first_layer_and_cuts_at_the_given_rate():
    torch.manual_seed(0)
    model = rt.RVQTokenizer(small_config("rvq", residual_dropout=0.3, num_layers=6))
    keep = model.sample_keep(20000)
    assert keep.min() >= 1 and keep.max() == 6
    assert abs(float((keep < 6).float().mean()) - 0.3) < 0.02
    assert set(keep.unique().tolist()) == {1, 2, 3, 4, 5, 6}
    no_cut = rt.RVQTokenizer(small_config("rvq", residual_dropout=0.0)).sample_keep(1000)
    assert torch.all(no_cut == LAYERS)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_encode_does_not_change_codebooks_and_bits_are_counted(quantizer, data):
    model = untrained(quantizer, data[0])
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(torch.as_tensor(data[0][:100]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    k = model.layer_codebook_sizes()[0]
    assert k == (64 if quantizer == "rvq" else 3 ** 8)
    assert model.bits_per_chunk(3) == pytest.approx(2 * 3 * np.log2(k))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, named", [
    (dict(num_layers=0), "num_layers"), (dict(codebook_size=1), "codebook_size"),
    (dict(fsq_levels=(4, 1)), "fsq_levels"), (dict(fsq_levels=()), "fsq_levels"),
    (dict(quantizer="vq"), "'vq'"), (dict(latent_steps=0), "latent_steps"),
    (dict(residual_dropout=1.0), "residual_dropout"), (dict(ema_decay=1.5), "ema_decay"),
])
def test_bad_config_raises_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        rt.RVQConfig(**kwargs)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_bad_codes_and_actions_raise_clear_errors(quantizer, data):
    model = untrained(quantizer, data[0]).eval()
    K = model.layer_codebook_sizes()[0]
    with pytest.raises(ValueError, match=f"prefix of {LAYERS + 1} layers.*num_layers={LAYERS}"):
        model.decode(torch.zeros(1, 2, LAYERS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=f"code {K} in layer 1 is out of range"):
        model.decode(torch.tensor([[[0, K], [0, 0]]]))
    with pytest.raises(ValueError, match="code -1"):
        model.decode(torch.tensor([[[-1], [0]]]))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match=r"\[B, 2, l\]"):
        model.decode(torch.zeros(1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 10, 7\].*\(4, 10, 6\)"):
        model.encode(torch.zeros(4, 10, 6))


def test_load_errors_name_the_file(tmp_path, data):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        rt.load_tokenizer(missing)
    good = str(tmp_path / "good.pt")
    rt.save_tokenizer(untrained("rvq", data[0]), good, {"args": {}, "seed": 0, "metrics": {}})
    truncated = str(tmp_path / "truncated.pt")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:2000])
    with pytest.raises(ValueError, match="truncated.pt.*cannot read"):
        rt.load_tokenizer(truncated)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"model": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a tokenizer checkpoint"):
        rt.load_tokenizer(foreign)
    ckpt = torch.load(good, weights_only=True)
    for name, change in (("future.pt", {"version": 99}),
                         ("mismatch.pt", {"config": {**ckpt["config"], "num_layers": LAYERS + 1}})):
        path = str(tmp_path / name)
        torch.save({**ckpt, **change}, path)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            rt.load_tokenizer(path)


def test_prefixes_approach_the_unquantized_autoencoder():
    """autoencode() is the limit of the prefixes: with the residual shrinking layer by layer,
    the last prefix's reconstruction is closer to it than the first's."""
    torch.manual_seed(0)
    x = torch.as_tensor(chunk_actions(synthetic_episodes(6, seed=2), 10))
    model = rt.RVQTokenizer(rt.RVQConfig(num_layers=6, codebook_size=64, hidden_dim=32))
    model.normalizer.fit(x)
    model.init_codebooks(x)
    model.eval()
    ae = model.autoencode(x)
    codes = model.encode(x)
    gaps = [float(((model.decode(codes[..., :l]) - ae) ** 2).mean()) for l in (1, 3, 6)]
    assert gaps[0] > gaps[1] > gaps[2]
    with torch.no_grad():
        direct = model.denormalize(model._decode_latent(model._encode_latent(model.normalize(x))))
    torch.testing.assert_close(ae, direct)


def test_encoding_and_decoding_follow_changed_codebooks(data, codes_like_a_fresh_copy):
    """RVQ's search tables and stacked codebooks are cached: after a codebook changes (in
    place, or replaced by a new tensor) the tokenizer must code as a fresh copy does."""
    model = untrained("rvq", data[0]).eval()
    x = torch.as_tensor(data[1][:40])
    codes = model.encode(x)
    model.decode(codes)  # every cache warm
    layers = model.quantizer.layers
    codes_like_a_fresh_copy(model, x, codes, [
        lambda: layers[0].codebook.mul_(1.5),
        lambda: setattr(layers[1], "codebook", layers[1].codebook.flip(0).clone())])
    assert not torch.equal(model.encode(x), codes)
