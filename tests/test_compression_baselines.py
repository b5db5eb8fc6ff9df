"""Unit tests of the baseline codecs (DCT keep-k, FAST, per-dimension binning) on synthetic
smooth chunks shaped like LIBERO action chunks ([B, T=10, D=7], normalized to [-1, 1])."""
import math

import numpy as np
import pytest

from compression_baselines import (DCTKeepK, FASTTokenizer, PerDimBinning, dct_time, error_stats,
                                   idct_time, uniform_dequantize, uniform_quantize)

T, D = 10, 7


def smooth_chunks(n, seed=0, t=T, d=D):
    """Random low-frequency motions: three sinusoids per dimension with amplitudes up to 0.3,
    so every value lies in [-0.9, 0.9]. Returns [n, t, d] float32."""
    rng = np.random.default_rng(seed)
    time = np.linspace(0, 1, t)[None, :, None]
    x = np.zeros((n, t, d))
    for f in (0.25, 0.5, 1.0):
        amp = rng.uniform(-0.3, 0.3, (n, 1, d)) / (1 + 2 * f)
        x += amp * np.sin(2 * np.pi * f * time + rng.uniform(0, 2 * np.pi, (n, 1, d)))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def train():
    return smooth_chunks(3000, seed=0)


@pytest.fixture(scope="module")
def test():
    return smooth_chunks(300, seed=1)


def test_dct_is_orthonormal_and_invertible(test):
    c = dct_time(test)
    np.testing.assert_allclose(idct_time(c), test, atol=1e-6)
    # orthonormal: energy is preserved per chunk and dimension
    np.testing.assert_allclose((c ** 2).sum(1), (test.astype(np.float64) ** 2).sum(1), rtol=1e-9)


def test_uniform_quantizer_error_is_half_a_bin_and_clips_count():
    x = np.linspace(-2, 2, 1001)
    idx, clipped = uniform_quantize(x, -1.0, 1.0, 256)
    assert idx.min() == 0 and idx.max() == 255
    assert clipped == np.count_nonzero(np.abs(x) > 1)
    inside = np.abs(x) <= 1
    err = np.abs(uniform_dequantize(idx, -1.0, 1.0, 256) - x)[inside]
    assert err.max() <= 1.0 / 256 + 1e-12
    with pytest.raises(ValueError, match="bin indices"):
        uniform_dequantize(np.array([256]), -1.0, 1.0, 256)


def test_dct_keep_all_is_lossless_up_to_quantization(train, test):
    codec = DCTKeepK(keep=T).fit(train)
    tokens = codec.encode(test)
    assert tokens.shape == (len(test), T * D) and tokens.dtype == np.int64
    assert tokens.min() >= 0 and tokens.max() < 256
    recon, failed = codec.decode(tokens)
    assert not failed.any()
    # Orthonormal DCT: squared error in time = squared error of the coefficients, each at most
    # half a bin of its own range (clipped test coefficients would break this bound: none here,
    # or they are counted).
    half_bin = (codec.hi - codec.lo) / (2 * codec.num_bins)  # [T, D]
    bound = (half_bin ** 2).sum(0)  # [D] per-dimension bound on the sum over time
    inside = np.all((dct_time(test) >= codec.lo) & (dct_time(test) <= codec.hi), axis=(1, 2))
    assert inside.mean() > 0.9, "test chunks should mostly fall within the training ranges"
    sq_err = ((recon - test).astype(np.float64) ** 2).sum(1)  # [B, D]
    assert np.all(sq_err[inside] <= bound + 1e-9)
    assert codec.budget() .tokens_per_chunk == T * D and codec.budget().bits_per_chunk == 8 * T * D


def test_dct_error_falls_with_k_and_budget(train, test):
    mses, bits = [], []
    for k in range(1, T + 1):
        codec = DCTKeepK(keep=k).fit(train)
        recon, _ = codec.decode(codec.encode(test))
        mses.append(error_stats(test, recon)["mse"])
        bits.append(codec.budget().bits_per_chunk)
    assert all(a > b for a, b in zip(mses[:4], mses[1:5])), mses
    assert bits == [8 * k * D for k in range(1, T + 1)]
    assert mses[0] > 10 * mses[-1]


def test_dct_keep_k_matches_truncation_without_quantization(train, test):
    """With many bins, keep-k equals plain DCT truncation (the quantizer is not the error)."""
    k = 3
    codec = DCTKeepK(keep=k, num_bins=2 ** 16).fit(np.concatenate([train, test]))  # no clipping
    recon, _ = codec.decode(codec.encode(test))
    c = dct_time(test)
    c[:, k:] = 0
    np.testing.assert_allclose(recon, idct_time(c), atol=1e-3)


def test_dct_bad_input(train):
    with pytest.raises(ValueError, match="keep"):
        DCTKeepK(keep=0)
    with pytest.raises(ValueError, match="exceeds"):
        DCTKeepK(keep=T + 1).fit(train)
    with pytest.raises(RuntimeError, match="fit"):
        DCTKeepK(keep=2).encode(train)
    codec = DCTKeepK(keep=2).fit(train)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(train[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.full((1, T, D), np.nan))


def test_binning_error_bounded_by_half_a_bin(test):
    codec = PerDimBinning(256).fit(test)
    tokens = codec.encode(test)
    assert tokens.shape == (len(test), T * D)
    recon, failed = codec.decode(tokens)
    assert not failed.any() and codec.last_clipped == 0
    assert np.abs(recon - test).max() <= 1.0 / 256 + 1e-6  # half of a bin of width 2/256
    assert codec.budget().bits_per_chunk == 8 * T * D


def test_binning_clips_out_of_range_and_counts():
    codec = PerDimBinning(256)
    x = np.zeros((1, T, D))
    x[0, 0, 0] = 3.0
    recon, _ = codec.decode(codec.encode(x))
    assert codec.last_clipped == 1
    assert recon[0, 0, 0] == pytest.approx(1 - 1 / 256)


def test_fast_round_trip_within_rounding(train, test):
    scale = 50.0
    # fit on the test chunks too: this checks the codec, so no coefficient may be clipped
    codec = FASTTokenizer(scale=scale, vocab_size=512).fit(np.concatenate([train, test]))
    tokens = codec.encode(test)
    assert codec.last_clipped == 0
    lengths = np.array([len(t) for t in tokens])
    assert lengths.min() >= 1
    # BPE compresses: fewer tokens than coefficients
    assert lengths.mean() < T * D
    recon, failed = codec.decode(tokens)
    assert not failed.any() and codec.last_failures == 0
    # rounding error per coefficient <= 0.5 / scale; orthonormal -> per-(chunk, dim) L2 bound
    sq_err = ((recon - test).astype(np.float64) ** 2).sum(1)
    assert sq_err.max() <= T * (0.5 / scale) ** 2 + 1e-9
    # decoding the encoder's integers is exact: re-encoding the reconstruction gives the same tokens
    assert codec.encode(recon) == tokens
    budget = codec.budget(tokens)
    assert budget.tokens_per_chunk == pytest.approx(lengths.mean())
    assert budget.bits_per_chunk == pytest.approx(lengths.mean() * math.log2(codec.trained_vocab_size))


def test_fast_larger_scale_costs_more_tokens_and_less_error(train, test):
    results = []
    for scale in (2.0, 20.0):
        codec = FASTTokenizer(scale=scale, vocab_size=512).fit(train)
        tokens = codec.encode(test)
        recon, _ = codec.decode(tokens)
        results.append((codec.budget(tokens).tokens_per_chunk, error_stats(test, recon)["mse"]))
    (tok_lo, mse_lo), (tok_hi, mse_hi) = results
    assert tok_hi > tok_lo and mse_hi < mse_lo


def test_fast_decode_failures_are_counted_not_zeroed(train, test):
    codec = FASTTokenizer(scale=10.0, vocab_size=512).fit(train)
    tokens = codec.encode(test[:4])
    bad = [tokens[0][:-1],                      # truncated: too few coefficients
           tokens[1] + tokens[1],                # too many coefficients
           [codec.trained_vocab_size + 5],       # unknown id
           tokens[3]]                            # fine
    recon, failed = codec.decode(bad)
    assert failed.tolist() == [True, True, True, False]
    assert codec.last_failures == 3
    assert np.isnan(recon[:3]).all(), "failed chunks must be NaN, never zeros"
    assert np.isfinite(recon[3]).all()
    with pytest.raises(ValueError, match="NaN"):
        error_stats(test[:4], recon)


def test_fast_clips_out_of_range_coefficients_and_counts(train):
    codec = FASTTokenizer(scale=10.0, vocab_size=512).fit(train)
    x = np.zeros((1, T, D))
    x[0, :, 0] = 5.0  # far outside the training range
    recon, failed = codec.decode(codec.encode(x))
    assert codec.last_clipped >= 1 and not failed.any()


def test_fast_alphabet_larger_than_vocab_is_an_error(train):
    with pytest.raises(ValueError, match="vocab_size"):
        FASTTokenizer(scale=1000.0, vocab_size=64).fit(train)


def test_error_stats():
    target = np.zeros((2, 2, 1))
    recon = np.array([[[1.0], [1.0]], [[0.0], [0.0]]])
    s = error_stats(target, recon)
    assert s["mse"] == 0.5 and s["mse_std"] == 0.5 and s["max_abs_err"] == 1.0
    assert s["mse_median"] == 0.5 and s["mse_p99"] == pytest.approx(0.99)
