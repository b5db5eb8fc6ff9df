"""RVQ without an encoder (``encoder="none"``): whole-chunk layers (T' residual stages each),
then step-group layers, fit by greedy residual k-means. Synthetic smooth actions, no simulator."""

import math

import numpy as np
import pytest
import torch

import rvq_tokenizer as rt
from demos import chunk_actions
from synthetic_data import synthetic_episodes
from rvq_tokenizer import fit_residual_kmeans, train_tokenizer

STEPS, LAYERS, K = 2, 3, 16


def config(**kw) -> rt.RVQConfig:
    return rt.RVQConfig(**{**dict(encoder="none", latent_steps=STEPS, num_layers=LAYERS, codebook_size=K), **kw})


@pytest.fixture(scope="module")
def data():
    episodes = synthetic_episodes(14, seed=3)
    return chunk_actions(episodes[2:], 10), chunk_actions(episodes[:2], 10)


@pytest.fixture(scope="module")
def fitted(data):
    torch.manual_seed(0)
    model, history = fit_residual_kmeans(config(), data[0], data[1], iters=10)
    return model, history


def with_beam(model: rt.RVQTokenizer, width: int) -> rt.RVQTokenizer:
    """The same fitted tokenizer, encoding with another beam width."""
    other = rt.RVQTokenizer(rt.RVQConfig(**{**model.config.__dict__, "beam_width": width}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def reference_greedy(model: rt.RVQTokenizer, x: torch.Tensor):
    """Stage by stage, by hand: the nearest code of each stage's codebook to what is left of
    the flattened normalized chunk, divided by the product of the scales of the codes chosen
    so far (chunk layers: T' stages over the whole chunk; group layers: T' groups of steps,
    one codebook, each group with its own scale). Returns codes [B, T', L] and the running
    sum after each layer."""
    residual = model.normalize(x).reshape(len(x), -1)
    B, C = residual.shape
    scales = model.quantizer.scales
    codes = torch.zeros(B, STEPS, LAYERS, dtype=torch.long)
    sums, running, stage = [], torch.zeros_like(residual), 0
    scale = torch.ones(B, STEPS)  # [chunk, group]; the same for every group in the chunk layers
    for l in range(LAYERS):
        if l < model.config.chunk_layers:
            for t in range(STEPS):
                cb = model.quantizer.layers[stage].codebook
                k = torch.cdist(residual / scale[:, :1], cb).argmin(1)
                codes[:, t, l] = k
                q = scale[:, :1] * cb[k]
                running, residual = running + q, residual - q
                scale = scale * scales[stage, k][:, None]
                stage += 1
        else:
            cb = model.quantizer.layers[stage].codebook
            assert cb.shape[1] == C // STEPS
            groups = residual.reshape(B, STEPS, C // STEPS)
            q = torch.zeros_like(groups)
            for t in range(STEPS):
                k = torch.cdist(groups[:, t] / scale[:, t:t + 1], cb).argmin(1)
                codes[:, t, l] = k
                q[:, t] = scale[:, t:t + 1] * cb[k]
                scale[:, t] = scale[:, t] * scales[stage, k]
            running, residual = running + q.reshape(B, C), residual - q.reshape(B, C)
            stage += 1
        sums.append(running.clone())
    return codes, sums


def reference_decode(model: rt.RVQTokenizer, codes: torch.Tensor) -> list[torch.Tensor]:
    """The running sum [B, C] after each layer of any codes, by hand."""
    B, scales, stage = codes.shape[0], model.quantizer.scales, 0
    running, scale, sums = 0, torch.ones(B, STEPS), []
    for l in range(codes.shape[-1]):
        if l < model.config.chunk_layers:
            for t in range(STEPS):
                k = codes[:, t, l]
                running = running + scale[:, :1] * model.quantizer.layers[stage].codebook[k]
                scale = scale * scales[stage, k][:, None]
                stage += 1
        else:
            k = codes[:, :, l]
            cb = model.quantizer.layers[stage].codebook
            running = running + (scale[..., None] * cb[k]).reshape(B, -1)
            scale = scale * scales[stage, k]
            stage += 1
        sums.append(running)
    return sums


def test_greedy_codes_are_the_nearest_codes_at_every_stage(fitted, data):
    model, _ = fitted
    assert model.quantizer.kinds == ["chunk", "chunk", "group"]  # chunk_layers = 2 by default
    assert model.config.cell_scale and model.config.beam_width == rt.DEFAULT_BEAM_WIDTH["none"] > 1
    greedy = with_beam(model, 1)
    x = torch.as_tensor(data[1])
    codes = greedy.encode(x)
    assert codes.dtype == torch.long and codes.shape == (len(x), STEPS, LAYERS)
    expected, _ = reference_greedy(model, x)
    assert torch.equal(codes, expected)
    # a beam of one path is the greedy search
    z = model.normalize(x).reshape(len(x), -1).numpy()
    assert np.array_equal(model.quantizer._beam(z, 1), expected.numpy())
    # the scales are fit: codes of tight and of wide cells scale the next stage differently
    assert model.quantizer.scales.std() > 0.1


def test_every_prefix_decodes_to_the_running_sum_and_error_falls(fitted, data):
    model, _ = fitted
    x = torch.as_tensor(data[1])  # held-out episodes
    codes = model.encode(x)  # beam search
    sums = reference_decode(model, codes)
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


def test_beam_search_codes_unseen_chunks_better_than_greedy(fitted, data):
    model, _ = fitted
    x = torch.as_tensor(data[1])
    beam, greedy = model.prefix_mse(x), with_beam(model, 1).prefix_mse(x)
    assert beam[-1] < 0.95 * greedy[-1], (beam, greedy)


def test_one_chunk_at_a_time_codes_and_decodes_as_the_batch(fitted, data):
    """A policy encodes and decodes one chunk at a time: the batch-1 search and sums must give
    the batch's codes and actions (greedy and beam)."""
    x = torch.as_tensor(data[1][:60])
    for model in (fitted[0], with_beam(fitted[0], 1)):
        codes = model.encode(x)
        one = torch.cat([model.encode(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(one, codes)
        for l in (1, LAYERS):
            batch = model.decode(codes[..., :l])
            assert torch.equal(torch.cat([model.decode(codes[i:i + 1, :, :l]) for i in range(len(x))]), batch)


def test_a_wide_enough_beam_finds_the_best_codes():
    """With room for every path, beam search returns codes whose final residual is the
    smallest over all code combinations (enumerated here: 3 x 3 chunk paths, then the best of
    3 codes for each of the 2 groups given the path)."""
    torch.manual_seed(1)
    K3, n, C = 3, 2, 6
    q = rt.StagedResidualQuantizer(2, n, C, K3, chunk_layers=1, cell_scale=True, beam_width=9)
    q.fit(torch.randn(60, 1, C), iters=5)
    q.scales.uniform_(0.3, 2.0)  # scales that matter
    z = torch.randn(50, C)
    codes = q.encode_codes(z.unsqueeze(1))
    got = ((z - q.decode_codes(codes)[:, 0]) ** 2).sum(1)
    best = torch.full((len(z),), float("inf"))
    for a in range(K3):
        for b in range(K3):
            s1 = q.scales[0, a]
            r = z - q.layers[0].codebook[a] - s1 * q.layers[1].codebook[b]
            s = s1 * q.scales[1, b]
            groups = r.reshape(len(z), n, C // n)
            err = ((groups[:, :, None] - s * q.layers[2].codebook) ** 2).sum(-1).min(-1).values.sum(1)
            best = torch.minimum(best, err)
    assert torch.allclose(got, best, atol=1e-5)
    greedy = torch.from_numpy(q._greedy(z.numpy()))
    assert (((z - q.decode_codes(greedy)[:, 0]) ** 2).sum(1) >= got - 1e-6).all()


def test_cell_scale_is_the_cells_relative_root_mean_square():
    torch.manual_seed(0)
    z = torch.randn(80, 1, 4) * torch.tensor([3.0, 1.0, 0.5, 0.1])
    q = rt.StagedResidualQuantizer(1, 1, 4, 6, chunk_layers=1, cell_scale=True)
    q.fit(z, iters=8, leave_one_out=False)
    code, cb = q.layers[0].quantize(z[:, 0]), q.layers[0].codebook
    energy = ((z[:, 0] - cb[code]) ** 2).mean(1)
    for k in range(6):
        members = energy[code == k]
        expected = ((members.sum() + rt.CELL_SCALE_PRIOR * energy.mean())
                    / (len(members) + rt.CELL_SCALE_PRIOR) / energy.mean()).sqrt()
        assert torch.allclose(q.scales[0, k], expected, rtol=1e-5)


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



def test_checkpoint_from_before_cell_scales_loads_as_fit(data, tmp_path):
    """A checkpoint whose config has no cell_scale / beam_width was fit and encoded without
    them: it loads that way, and encodes greedily as before."""
    torch.manual_seed(0)
    plain, _ = fit_residual_kmeans(config(cell_scale=False, beam_width=1), data[0], data[1], iters=5)
    assert "quantizer.scales" not in plain.state_dict()
    path = str(tmp_path / "old.pt")
    rt.save_tokenizer(plain, path, {"test": True})
    ckpt = torch.load(path, weights_only=True)
    for key in ("cell_scale", "beam_width"):
        del ckpt["config"][key]
    torch.save(ckpt, path)
    loaded, _ = rt.load_tokenizer(path)
    assert not loaded.config.cell_scale and loaded.config.beam_width == 1
    x = torch.as_tensor(data[1])
    assert torch.equal(loaded.encode(x), plain.encode(x))


def test_cell_scale_and_beam_belong_to_the_staged_quantizer():
    assert rt.RVQConfig().cell_scale is False and rt.RVQConfig().beam_width == 1
    with pytest.raises(ValueError, match="belong to encoder 'none'"):
        rt.RVQConfig(beam_width=4)
    with pytest.raises(ValueError, match="belong to encoder 'none'"):
        rt.RVQConfig(cell_scale=True)
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        config(beam_width=0)


@pytest.mark.parametrize("chunk_layers", [0, LAYERS])
def test_groups_only_and_chunks_only_encode_and_decode(chunk_layers, data):
    torch.manual_seed(0)
    model, _ = fit_residual_kmeans(config(chunk_layers=chunk_layers), data[0], data[1], iters=5)
    assert model.quantizer.kinds == ["group" if chunk_layers == 0 else "chunk"] * LAYERS
    x = torch.as_tensor(data[1])
    codes = model.encode(x)
    for l, expected in enumerate(reference_decode(model, codes), 1):
        assert torch.allclose(model.normalize(model.decode(codes[..., :l])), expected.reshape(x.shape), atol=1e-5)
    greedy, _ = reference_greedy(model, x)
    assert torch.equal(with_beam(model, 1).encode(x), greedy)
    beam_err, greedy_err = model.prefix_mse(x)[-1], with_beam(model, 1).prefix_mse(x)[-1]
    assert beam_err <= greedy_err


def test_encoding_and_decoding_follow_changed_codebooks_and_scales(fitted, data, codes_like_a_fresh_copy):
    """The search tables and stacked codebooks are cached: after codebooks or scales change
    (in place, or replaced by new tensors) the tokenizer must code as a fresh copy does."""
    model = with_beam(fitted[0], 4)
    x = torch.as_tensor(data[1][:40])
    codes = model.encode(x)
    model.decode(codes)  # every cache warm
    q = model.quantizer
    codes_like_a_fresh_copy(model, x, codes, [
        lambda: q.layers[0].codebook.mul_(1.5), lambda: q.scales.mul_(0.8),
        lambda: setattr(q, "scales", q.scales.flip(1).clone()),
        lambda: setattr(q.layers[STEPS], "codebook", q.layers[STEPS].codebook.flip(0).clone())])
    assert not torch.equal(model.encode(x), codes)
