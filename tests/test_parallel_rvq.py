"""RVQ in the chunk's principal axes with parallel positions (``encoder="pca"``): a fixed
orthogonal encoder (``PrincipalAxes``), one codebook per layer shared by the T' positions, cell
scales, a beam per position, fit by residual k-means (``ParallelResidualQuantizer``). Synthetic
smooth actions, no simulator."""

import numpy as np
import pytest
import torch

import rvq_tokenizer as rt
from demos import chunk_actions
from rvq_tokenizer import fit_residual_kmeans, train_tokenizer
from synthetic_data import synthetic_episodes

LAYERS, K = 4, 16


def config(**kw) -> rt.RVQConfig:
    return rt.RVQConfig(**{**dict(encoder="pca", latent_steps=2, num_layers=LAYERS, codebook_size=K), **kw})


@pytest.fixture(scope="module")
def data():
    episodes = synthetic_episodes(14, seed=3)
    return chunk_actions(episodes[2:], 10), chunk_actions(episodes[:2], 10)


@pytest.fixture(scope="module", params=[dict(), dict(cell_scale=False, beam_width=1), dict(latent_steps=3, beam_width=2)],
                ids=["scales-beam8", "plain-greedy", "T3-padded-beam2"])
def fitted(request, data):
    torch.manual_seed(0)
    return fit_residual_kmeans(config(**request.param), data[0], data[1], iters=10)


def with_beam(model: rt.RVQTokenizer, width: int) -> rt.RVQTokenizer:
    """The same fitted tokenizer, encoding with another beam width."""
    other = rt.RVQTokenizer(rt.RVQConfig(**{**model.config.__dict__, "beam_width": width}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def latent(model: rt.RVQTokenizer, x) -> torch.Tensor:
    """The chunks' principal coordinates z [B, T', c]."""
    return model._encode_latent(model.normalize(torch.as_tensor(x)))


def reference_greedy(model: rt.RVQTokenizer, z: torch.Tensor) -> torch.Tensor:
    """By hand, position by position: the nearest code of layer l's codebook to what is left
    of the position, divided by the product of the scales of the position's codes so far."""
    q = model.quantizer
    B, n, c = z.shape
    codes = torch.zeros(B, n, LAYERS, dtype=torch.long)
    for t in range(n):
        residual, scale = z[:, t].clone(), torch.ones(B)
        for l in range(LAYERS):
            cb = q.layers[l].codebook
            k = torch.cdist(residual / scale[:, None], cb).argmin(1)
            codes[:, t, l] = k
            residual = residual - scale[:, None] * cb[k]
            if q.cell_scale:
                scale = scale * q.scales[l, k]
    return codes


def reference_latent(model: rt.RVQTokenizer, codes: torch.Tensor) -> torch.Tensor:
    """By hand: the sum over layers of each position's code vector times its running scale."""
    q = model.quantizer
    running, scale = 0, torch.ones(codes.shape[:2])
    for l in range(codes.shape[-1]):
        k = codes[..., l]
        running = running + scale[..., None] * q.layers[l].codebook[k]
        if q.cell_scale:
            scale = scale * q.scales[l, k]
    return running


def test_defaults_and_shapes(fitted, data):
    model, _ = fitted
    c = model.config
    assert c.quantizer_dim == -(-70 // c.latent_steps)
    codes = model.encode(torch.as_tensor(data[1]))
    assert codes.dtype == torch.long and codes.shape == (len(data[1]), c.latent_steps, LAYERS)
    assert model.layer_codebook_sizes() == [K] * LAYERS
    assert model.bits_per_chunk(2) == 2 * c.latent_steps * 4
    default = rt.RVQConfig(encoder="pca")
    assert default.cell_scale and default.beam_width == rt.DEFAULT_BEAM_WIDTH["pca"] == 8


def test_the_encoder_is_the_principal_axes_dealt_out_in_turn(fitted, data):
    """Orthonormal columns (zero ones pad T * D up to T' * c), so unquantized chunks decode
    exactly; the training chunks' coordinates are uncorrelated, strongest first, axis j at
    position j mod T'."""
    model, _ = fitted
    n, c = model.config.latent_steps, model.config.quantizer_dim
    basis = model.encoder.basis
    assert basis.shape == (70, n * c)
    gram = basis.t() @ basis
    real = basis.norm(dim=0) > 0.5                      # the 70 axes; the rest pad
    assert int(real.sum()) == 70 and int(torch.count_nonzero(basis[:, ~real])) == 0
    torch.testing.assert_close(gram[real][:, real], torch.eye(70), atol=1e-5, rtol=0)
    x = torch.as_tensor(data[1])
    torch.testing.assert_close(model.autoencode(x), x, atol=1e-4, rtol=0)
    z = latent(model, data[0]).double()                 # [N, T', c]
    variance = z.var(0).t().reshape(-1)                  # axis j = i * T' + t at [i, t] -> order j
    assert bool((variance[:70][:-1] >= variance[:70][1:] - 1e-6).all())
    cov = torch.cov(z.reshape(len(z), -1).t())
    assert float((cov - torch.diag(torch.diag(cov))).abs().max()) < 1e-4 * float(cov.diag().max())


def test_greedy_codes_are_the_nearest_codes_position_by_position(fitted, data):
    model, _ = fitted
    greedy = with_beam(model, 1)
    z = latent(model, data[1])
    assert torch.equal(greedy.encode(torch.as_tensor(data[1])), reference_greedy(model, z))
    if model.config.cell_scale:  # the scales are fit: tight and wide cells scale the next layer differently
        assert model.quantizer.scales.std() > 0.05


def test_the_beam_leaves_less_than_the_nearest_codes(fitted, data):
    model, _ = fitted
    x = torch.as_tensor(data[1])
    z = latent(model, data[1])
    wide, greedy = with_beam(model, 8), with_beam(model, 1)

    def left(m):
        return ((z - m.quantizer.decode_codes(m.encode(x))) ** 2).sum(-1)  # [B, T'] per position

    assert float(left(wide).mean()) < float(left(greedy).mean())
    assert float((left(wide) <= left(greedy) + 1e-6).float().mean()) > 0.9


def test_forward_equals_decode_of_codes_and_every_prefix_decodes(fitted, data):
    model, history = fitted
    x = torch.as_tensor(data[1])
    out = model(x)
    codes = model.encode(x)
    assert torch.equal(out.codes, codes)
    assert torch.equal(model.decode(codes), model.denormalize(out.recon))
    mse = history["train_prefix_mse"]
    assert all(b < a for a, b in zip(mse, mse[1:]))
    sums = model.quantizer(latent(model, data[1])).prefix_latents  # [L, B, T', c]
    for l in range(1, LAYERS + 1):
        prefix = model.quantizer.decode_codes(codes[..., :l])  # [B, T', c]
        assert torch.equal(prefix, sums[l - 1])
        torch.testing.assert_close(prefix, reference_latent(model, codes[..., :l]), atol=1e-5, rtol=1e-5)
        decoded = model.decode(codes[..., :l])
        assert decoded.shape == x.shape
        assert torch.equal(decoded, model.denormalize(model.decode_latent(prefix)))
    keep = torch.randint(1, LAYERS + 1, (len(x),))
    cut = model.quantizer(latent(model, data[1]), keep).quantized
    assert torch.equal(cut, sums[keep - 1, torch.arange(len(x))])


def test_positions_are_parallel(fitted, data):
    """A position's codes depend on that position alone, with the beam too."""
    model, _ = fitted
    z = latent(model, data[1][:64])
    other = z.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    q = model.quantizer
    assert torch.equal(q.encode_codes(z)[:, 0], q.encode_codes(other)[:, 0])
    codes = q.encode_codes(z)
    mixed = codes.clone()
    mixed[:, 1:] = torch.randint(0, K, mixed[:, 1:].shape)
    assert torch.equal(q.decode_codes(codes)[:, 0], q.decode_codes(mixed)[:, 0])


def test_save_and_reload_are_exact(fitted, data, tmp_path):
    model, _ = fitted
    x = torch.as_tensor(data[1])
    codes = model.encode(x)
    path = str(tmp_path / "pca.pt")
    rt.save_tokenizer(model, path, {"test": True})
    again, _ = rt.load_tokenizer(path)
    folder = model.save_pretrained(str(tmp_path / "pca"))
    shared = rt.RVQTokenizer.from_pretrained(folder)
    for copy in (again, shared):
        assert copy.config == model.config
        assert list(copy.state_dict()) == list(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value), key
        assert torch.equal(copy.encode(x), codes)
        for l in range(1, LAYERS + 1):
            assert torch.equal(copy.decode(codes[..., :l]), model.decode(codes[..., :l]))


def test_caches_follow_the_codebooks_and_scales(fitted, data, codes_like_a_fresh_copy):
    model, _ = fitted
    model = with_beam(model, model.config.beam_width)  # a copy: the fixture's model stays as fit
    x = torch.as_tensor(data[1][:32])
    codes = model.encode(x)
    q = model.quantizer
    changes = [lambda: q.layers[1].codebook.mul_(1.5), lambda: model.encoder.basis.mul_(-1.0)]
    if q.cell_scale:
        changes.append(lambda: q.scales.mul_(0.5))
    codes_like_a_fresh_copy(model, x, codes, changes)


def test_bad_configs_and_gradient_training_raise(data):
    with pytest.raises(ValueError, match="encoder 'pca' needs quantizer 'rvq'"):
        config(quantizer="rfsq")
    with pytest.raises(ValueError, match="more positions than axes"):
        config(latent_steps=71)
    with pytest.raises(ValueError, match="fit_residual_kmeans"):
        train_tokenizer(config(), data[0], data[1], epochs=1, batch_size=8, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="at least 2 training chunks"):
        rt.PrincipalAxes(70, 2).fit(torch.zeros(1, 70))
