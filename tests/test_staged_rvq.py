"""RVQ without an encoder (``encoder="none"``): whole-chunk layers (T' residual stages each),
then step-group layers, fit by greedy residual k-means. Synthetic smooth actions, no simulator."""

import math

import numpy as np
import pytest
import torch

import rvq_tokenizer as rt
from train_rvq_tokenizer import fit_residual_kmeans, train_tokenizer

STEPS, LAYERS, K = 2, 3, 16


def config(**kw) -> rt.RVQConfig:
    return rt.RVQConfig(**{**dict(encoder="none", latent_steps=STEPS, num_layers=LAYERS, codebook_size=K), **kw})


@pytest.fixture(scope="module")
def data():
    episodes = rt.synthetic_episodes(14, seed=3)
    return rt.sliding_chunks(episodes[2:], 10), rt.sliding_chunks(episodes[:2], 10)


@pytest.fixture(scope="module")
def fitted(data):
    torch.manual_seed(0)
    model, history = fit_residual_kmeans(config(), data[0], data[1], iters=10)
    return model, history


def reference_greedy(model: rt.RVQTokenizer, x: torch.Tensor):
    """Stage by stage, by hand: the nearest code of each stage's codebook to what is left of
    the flattened normalized chunk (chunk layers: T' stages over the whole chunk; group
    layers: T' groups of steps, one codebook). Returns codes [B, T', L] and the running sum
    after each layer."""
    residual = model.normalize(x).reshape(len(x), -1)
    B, C = residual.shape
    codes = torch.zeros(B, STEPS, LAYERS, dtype=torch.long)
    sums, running, stages = [], torch.zeros_like(residual), iter(model.quantizer.layers)
    for l in range(LAYERS):
        if l < model.config.chunk_layers:
            for t in range(STEPS):
                cb = next(stages).codebook
                codes[:, t, l] = torch.cdist(residual, cb).argmin(1)
                running, residual = running + cb[codes[:, t, l]], residual - cb[codes[:, t, l]]
        else:
            cb = next(stages).codebook
            assert cb.shape[1] == C // STEPS
            groups = residual.reshape(B, STEPS, C // STEPS)
            for t in range(STEPS):
                codes[:, t, l] = torch.cdist(groups[:, t], cb).argmin(1)
            q = cb[codes[:, :, l]].reshape(B, C)
            running, residual = running + q, residual - q
        sums.append(running.clone())
    return codes, sums


def test_codes_are_the_greedy_stage_codes(fitted, data):
    model, _ = fitted
    assert model.quantizer.kinds == ["chunk", "chunk", "group"]  # chunk_layers = 2 by default
    x = torch.as_tensor(data[1])
    codes = model.encode(x)
    assert codes.dtype == torch.long and codes.shape == (len(x), STEPS, LAYERS)
    expected, _ = reference_greedy(model, x)
    assert torch.equal(codes, expected)


def test_every_prefix_decodes_to_the_running_sum_and_error_falls(fitted, data):
    model, _ = fitted
    x = torch.as_tensor(data[1])  # held-out episodes
    codes = model.encode(x)
    _, sums = reference_greedy(model, x)
    errors = []
    for l in range(1, LAYERS + 1):
        out = model.normalize(model.decode(codes[..., :l]))
        expected = sums[l - 1].reshape(x.shape)
        assert torch.allclose(out, expected, atol=1e-5)
        errors.append(float(((out - model.normalize(x)) ** 2).mean()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert np.allclose(errors, model.prefix_mse(x).numpy(), rtol=1e-4)
    # the eval forward decodes all layers, exactly as decode(encode(x))
    assert torch.allclose(model(x).recon, model.normalize(model.decode(codes)), atol=1e-5)


def test_fit_reports_train_and_held_out_error_per_layer(fitted, data):
    model, history = fitted
    assert history["epoch"] == [] and len(history["train_prefix_mse"]) == LAYERS
    assert np.allclose(history["val_prefix_mse"][-1], model.prefix_mse(torch.as_tensor(data[1])).numpy())
    # the stages are fit on the training chunks: they fit those better than unseen episodes
    assert history["train_prefix_mse"][-1] < history["val_prefix_mse"][-1][-1]


def test_bits_sizes_and_reload(fitted, data, tmp_path):
    model, _ = fitted
    assert model.layer_codebook_sizes() == [K] * LAYERS
    assert model.bits_per_chunk(2) == STEPS * 2 * math.log2(K)
    assert not any(k.startswith(("encoder.", "decoder.")) for k in model.state_dict())
    path = str(tmp_path / "staged.pt")
    rt.save_tokenizer(model, path, {"test": True})
    loaded, _ = rt.load_tokenizer(path)
    x = torch.as_tensor(data[1])
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)[..., :2]), model.decode(model.encode(x)[..., :2]))
    # nothing is lost by the missing encoder: unquantized, the chunk comes back
    assert torch.allclose(model.autoencode(x), x, atol=1e-5)


def test_out_of_range_code_is_refused(fitted):
    model, _ = fitted
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full((1, STEPS, 1), K))


def test_bad_configs_and_gradient_training_raise(data):
    with pytest.raises(ValueError, match="encoder 'none' needs quantizer 'rvq'"):
        config(quantizer="rfsq")
    with pytest.raises(ValueError, match="encoder must be one of"):
        config(encoder="conv")
    with pytest.raises(ValueError, match="fit_residual_kmeans"):
        train_tokenizer(config(), data[0], data[1], epochs=1, batch_size=8, lr=1e-3, progress=False)


def test_policy_engine_refuses_a_tokenizer_without_encoder(fitted):
    import policy_models as pm
    from rsd_engine_core import RSDEngine

    model, _ = fitted
    c = model.config
    policy = pm.TokenPolicy(pm.PolicyConfig(
        obs_dim=4, instructions=("a",), latent_steps=c.latent_steps, num_layers=c.num_layers,
        codebook_sizes=model.layer_codebook_sizes(), d_model=16, n_heads=2, n_blocks=1, obs_tokens=1))
    with pytest.raises(ValueError, match="encoder 'none'"):
        RSDEngine(policy, model)


def test_leave_one_out_residual_is_the_error_without_the_chunk_itself():
    torch.manual_seed(0)
    z = torch.randn(40, 1, 6)
    q = rt.StagedResidualQuantizer(1, 1, 6, 8, chunk_layers=1)
    left = q.fit(z, iters=5)
    vq = q.layers[0]
    code = vq.quantize(z[:, 0])
    checked = 0
    for i in range(len(z)):
        members = torch.nonzero(code == code[i]).squeeze(1)
        others = members[members != i]
        if not len(others):  # a code of one chunk: the chunk is passed on
            assert torch.equal(left[i], z[i, 0])
            checked += 1
        elif torch.allclose(vq.codebook[code[i]], z[members, 0].mean(0), atol=1e-5):
            # (k-means converged for this code) the centroid fit without chunk i is the mean
            # of the others
            assert torch.allclose(left[i], z[i, 0] - z[others, 0].mean(0), atol=1e-4)
            checked += 1
    assert checked > len(z) // 2

