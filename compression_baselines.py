"""Baseline codecs for action chunks: DCT keep-k, FAST (DCT + BPE) and per-dimension binning.

Every codec works on *normalized* chunks `x: [B, T, D]` (actions mapped per dimension to
[-1, 1] by the tokenizer's q01/q99 normalizer), so the baselines and the residual tokenizer
are compared on the same numbers. Each codec has the same small interface:

    codec.fit(train_chunks)          # [M, T, D]; learns ranges / the BPE vocabulary (training data only)
    tokens = codec.encode(x)         # x: [B, T, D] -> tokens (see each class)
    x_hat, failed = codec.decode(tokens)   # -> [B, T, D] float32 and a [B] bool mask
    codec.budget(tokens)             # -> Budget(tokens_per_chunk, bits_per_chunk)

Bit accounting (one rule for every method, including the RVQ tokenizer): a token drawn from
a vocabulary of V symbols costs log2(V) bits. So a 256-bin token is 8 bits, an RVQ code of a
256-entry codebook is 8 bits, and a FAST BPE token is log2(BPE vocabulary size) bits.
Codec parameters (ranges, codebooks, the BPE merges) are model state, not side information.

FAST follows Pertsch et al. 2025, "FAST: Efficient Action Tokenization for
Vision-Language-Action Models" (arXiv:2501.09747): orthonormal DCT over time for each
dimension, multiply by a scale, round to integers, flatten with the low frequencies of all
dimensions first, and compress the integer string with byte-pair encoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer, models, trainers

# 256 bins = one byte per token: the OpenVLA / RT-2 discretization that the seed compares to.
DEFAULT_NUM_BINS = 256
# FAST's default scale for actions normalized to [-1, 1] (the released tokenizer uses 10)
# and its default BPE vocabulary (openpi's FAST tokenizer uses 1024).
FAST_DEFAULT_SCALE = 10.0
FAST_DEFAULT_VOCAB = 1024
# Integers are written as characters of Unicode's private use area so that the BPE never
# meets whitespace or control characters (no pre-tokenizer splits, no normalizer changes).
_CHAR_OFFSET = 0xE000
_MAX_ALPHABET = 0xF8FF - 0xE000 + 1


@dataclass
class Budget:
    """Cost of a set of encoded chunks: mean tokens per chunk and mean bits per chunk."""

    tokens_per_chunk: float
    bits_per_chunk: float


def _check_chunks(x: np.ndarray, name: str = "chunks") -> np.ndarray:
    """Validate `x: [B, T, D]` finite numbers and return it as float64."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [B, T, D], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf values")
    return x.astype(np.float64)


def dct_time(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II over time. x: [B, T, D] -> coefficients [B, T, D] (index 1 = frequency)."""
    return dct(np.asarray(x, dtype=np.float64), type=2, axis=1, norm="ortho")


def idct_time(c: np.ndarray) -> np.ndarray:
    """Inverse of `dct_time`. c: [B, T, D] -> chunks [B, T, D]."""
    return idct(np.asarray(c, dtype=np.float64), type=2, axis=1, norm="ortho")


def uniform_quantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, num_bins: int):
    """Uniform quantization of x into `num_bins` equal bins spanning [lo, hi] (broadcast).

    Values outside [lo, hi] are clipped into the end bins. Returns (indices int64 in
    [0, num_bins), number of clipped values). Reconstruction is the bin centre, so the error
    of an unclipped value is at most half a bin width, (hi - lo) / (2 * num_bins).
    """
    width = (hi - lo) / num_bins
    scaled = (x - lo) / width
    clipped = int(np.count_nonzero((x < lo) | (x > hi)))
    idx = np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.int64)
    return idx, clipped


def uniform_dequantize(idx: np.ndarray, lo: np.ndarray, hi: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin centres of `uniform_quantize`'s indices."""
    if np.any((idx < 0) | (idx >= num_bins)):
        raise ValueError(f"bin indices must lie in [0, {num_bins}), got range [{idx.min()}, {idx.max()}]")
    width = (hi - lo) / num_bins
    return lo + (idx + 0.5) * width


class DCTKeepK:
    """Keep the first `keep` DCT coefficients of every dimension, 256-bin quantize each.

    Quantization rule: coefficient (k, d) is quantized uniformly into `num_bins` bins over
    [min, max] of that coefficient on the training chunks (a degenerate range is widened to
    +-1e-6); test values outside that range are clipped and counted in `last_clipped`.
    Tokens: [B, keep * D] integers in [0, num_bins), low frequency first (k-major).
    Budget: keep * D tokens of log2(num_bins) bits.
    """

    def __init__(self, keep: int, num_bins: int = DEFAULT_NUM_BINS):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.keep, self.num_bins = keep, num_bins
        self.lo = self.hi = None  # [keep, D] after fit
        self.chunk_shape = None  # (T, D)
        self.last_clipped = 0

    @property
    def name(self) -> str:
        return f"dct_k{self.keep}"

    def fit(self, train_chunks: np.ndarray) -> "DCTKeepK":
        x = _check_chunks(train_chunks, "train_chunks")
        _, t, d = x.shape
        if self.keep > t:
            raise ValueError(f"keep={self.keep} exceeds the chunk length T={t}")
        c = dct_time(x)[:, : self.keep]  # [M, keep, D]
        lo, hi = c.min(axis=0), c.max(axis=0)
        degenerate = hi - lo < 2e-6
        self.lo = np.where(degenerate, lo - 1e-6, lo)
        self.hi = np.where(degenerate, hi + 1e-6, hi)
        self.chunk_shape = (t, d)
        return self

    def _require_fit(self, x: np.ndarray):
        if self.lo is None:
            raise RuntimeError(f"{self.name}: call fit(train_chunks) before encode/decode")
        if x.shape[1:] != self.chunk_shape:
            raise ValueError(f"{self.name} was fit on chunks of shape {self.chunk_shape}, got {x.shape[1:]}")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: [B, T, D] normalized -> tokens [B, keep * D] int64."""
        x = _check_chunks(x)
        self._require_fit(x)
        c = dct_time(x)[:, : self.keep]
        idx, self.last_clipped = uniform_quantize(c, self.lo, self.hi, self.num_bins)
        return idx.reshape(len(x), -1)

    def decode(self, tokens: np.ndarray):
        """tokens [B, keep * D] -> (chunks [B, T, D] float32, failed [B] bool, always False)."""
        if self.lo is None:
            raise RuntimeError(f"{self.name}: call fit(train_chunks) before decode")
        t, d = self.chunk_shape
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.keep * d:
            raise ValueError(f"{self.name} expects tokens [B, {self.keep * d}], got {tokens.shape}")
        c = np.zeros((len(tokens), t, d))
        c[:, : self.keep] = uniform_dequantize(tokens.reshape(len(tokens), self.keep, d), self.lo, self.hi, self.num_bins)
        return idct_time(c).astype(np.float32), np.zeros(len(tokens), dtype=bool)

    def budget(self, tokens=None) -> Budget:
        n = self.keep * self.chunk_shape[1]
        return Budget(float(n), n * math.log2(self.num_bins))


class PerDimBinning:
    """OpenVLA-style discretization: every step of every dimension into `num_bins` uniform
    bins over the normalized range [-1, 1] (values outside are clipped), decoded to bin centres.

    Tokens: [B, T * D] integers in [0, num_bins). Budget: T * D tokens of log2(num_bins) bits.
    Nothing to learn: `fit` only records the chunk shape.
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, low: float = -1.0, high: float = 1.0):
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if not high > low:
            raise ValueError(f"binning range must have high > low, got [{low}, {high}]")
        self.num_bins, self.low, self.high = num_bins, float(low), float(high)
        self.chunk_shape = None
        self.last_clipped = 0

    @property
    def name(self) -> str:
        return f"binning_{self.num_bins}"

    def fit(self, train_chunks: np.ndarray) -> "PerDimBinning":
        self.chunk_shape = _check_chunks(train_chunks, "train_chunks").shape[1:]
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: [B, T, D] normalized -> tokens [B, T * D] int64."""
        x = _check_chunks(x)
        self.chunk_shape = self.chunk_shape or x.shape[1:]
        idx, self.last_clipped = uniform_quantize(x, self.low, self.high, self.num_bins)
        return idx.reshape(len(x), -1)

    def decode(self, tokens: np.ndarray):
        """tokens [B, T * D] -> (chunks [B, T, D] float32, failed [B] bool, always False)."""
        if self.chunk_shape is None:
            raise RuntimeError(f"{self.name}: fit or encode once before decode (chunk shape unknown)")
        tokens = np.asarray(tokens)
        x = uniform_dequantize(tokens, self.low, self.high, self.num_bins)
        return x.reshape(len(tokens), *self.chunk_shape).astype(np.float32), np.zeros(len(tokens), dtype=bool)

    def budget(self, tokens=None) -> Budget:
        n = int(np.prod(self.chunk_shape))
        return Budget(float(n), n * math.log2(self.num_bins))


class FASTTokenizer:
    """FAST: DCT over time per dimension, scale, round, BPE over the integer string.

    The alphabet is the range of rounded, scaled coefficients seen in the training chunks;
    test coefficients outside it are clipped to its ends and counted in `last_clipped` (the
    released FAST clips at the low end only and lets the BPE drop unknown symbols, which then
    fails to decode). Tokens: one list of BPE ids per chunk (variable length).

    decode never invents values: a sequence whose ids are unknown, or whose symbols do not
    make exactly T * D coefficients, is a *decode failure*: its row is NaN and `failed` is
    True, and `last_failures` counts them.
    """

    def __init__(self, scale: float = FAST_DEFAULT_SCALE, vocab_size: int = FAST_DEFAULT_VOCAB, min_frequency: int = 2):
        if not scale > 0:
            raise ValueError(f"FAST scale must be > 0, got {scale}")
        if vocab_size < 2:
            raise ValueError(f"FAST vocab_size must be >= 2, got {vocab_size}")
        self.scale, self.vocab_size, self.min_frequency = float(scale), int(vocab_size), int(min_frequency)
        self.bpe: Tokenizer | None = None
        self.min_int = self.max_int = None
        self.chunk_shape = None
        self.last_clipped = 0
        self.last_failures = 0

    @property
    def name(self) -> str:
        return f"fast_s{self.scale:g}"

    def _ints(self, x: np.ndarray) -> np.ndarray:
        """x: [B, T, D] -> rounded scaled coefficients [B, T * D] int64, low frequencies first."""
        return np.rint(dct_time(x) * self.scale).astype(np.int64).reshape(len(x), -1)

    def _to_strings(self, ints: np.ndarray) -> list[str]:
        codes = ints - self.min_int + _CHAR_OFFSET
        return ["".join(map(chr, row)) for row in codes.tolist()]

    def fit(self, train_chunks: np.ndarray) -> "FASTTokenizer":
        """Train the BPE on the training chunks [M, T, D] (normalized)."""
        x = _check_chunks(train_chunks, "train_chunks")
        ints = self._ints(x)
        self.min_int, self.max_int = int(ints.min()), int(ints.max())
        alphabet_size = self.max_int - self.min_int + 1
        if alphabet_size > min(self.vocab_size, _MAX_ALPHABET):
            raise ValueError(
                f"FAST scale {self.scale:g} gives {alphabet_size} distinct integers, more than the "
                f"vocab_size {self.vocab_size}; lower the scale or raise the vocabulary")
        self.chunk_shape = x.shape[1:]
        alphabet = [chr(_CHAR_OFFSET + i) for i in range(alphabet_size)]
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, min_frequency=self.min_frequency,
                                      initial_alphabet=alphabet, special_tokens=[], show_progress=False)
        bpe.train_from_iterator(self._to_strings(ints), trainer=trainer)
        self.bpe = bpe
        self._id_to_token = [bpe.id_to_token(i) for i in range(bpe.get_vocab_size())]
        return self

    @property
    def trained_vocab_size(self) -> int:
        """Number of BPE tokens actually learned (<= vocab_size when merges run out)."""
        return len(self._id_to_token)

    def encode(self, x: np.ndarray) -> list[list[int]]:
        """x: [B, T, D] normalized -> list of B BPE id lists."""
        if self.bpe is None:
            raise RuntimeError(f"{self.name}: call fit(train_chunks) before encode")
        x = _check_chunks(x)
        if x.shape[1:] != self.chunk_shape:
            raise ValueError(f"{self.name} was fit on chunks of shape {self.chunk_shape}, got {x.shape[1:]}")
        ints = self._ints(x)
        self.last_clipped = int(np.count_nonzero((ints < self.min_int) | (ints > self.max_int)))
        ints = np.clip(ints, self.min_int, self.max_int)
        return [enc.ids for enc in self.bpe.encode_batch(self._to_strings(ints))]

    def _decode_one(self, ids) -> np.ndarray | None:
        """BPE ids -> integer coefficients [T * D], or None when they do not form a chunk."""
        pieces = []
        for i in ids:
            if not 0 <= int(i) < len(self._id_to_token):
                return None
            pieces.append(self._id_to_token[int(i)])
        codes = np.fromiter((ord(ch) for ch in "".join(pieces)), dtype=np.int64)
        if codes.size != int(np.prod(self.chunk_shape)):
            return None
        return codes - _CHAR_OFFSET + self.min_int

    def decode(self, token_lists):
        """B id lists -> (chunks [B, T, D] float32 with NaN rows for failures, failed [B] bool)."""
        if self.bpe is None:
            raise RuntimeError(f"{self.name}: call fit(train_chunks) before decode")
        t, d = self.chunk_shape
        coeffs = np.full((len(token_lists), t * d), np.nan)
        failed = np.zeros(len(token_lists), dtype=bool)
        for b, ids in enumerate(token_lists):
            ints = self._decode_one(ids)
            if ints is None:
                failed[b] = True
            else:
                coeffs[b] = ints / self.scale
        self.last_failures = int(failed.sum())
        return idct_time(coeffs.reshape(-1, t, d)).astype(np.float32), failed

    def budget(self, token_lists) -> Budget:
        """Mean BPE tokens per chunk; bits = tokens * log2(trained vocabulary size)."""
        mean_tokens = float(np.mean([len(ids) for ids in token_lists]))
        return Budget(mean_tokens, mean_tokens * math.log2(self.trained_vocab_size))


def error_stats(target: np.ndarray, recon: np.ndarray) -> dict:
    """Per-chunk MSE statistics. target, recon: [B, T, D] in the same units.

    Returns {"mse": mean over chunks of the per-chunk MSE (mean over T * D), "mse_std": its
    standard deviation over chunks, "mse_median" / "mse_p99": percentiles of the per-chunk MSE
    (a mean driven by a few badly reconstructed chunks shows as mse >> mse_median),
    "max_abs_err": max |error| over every element}.
    Rows of `recon` with NaN (decode failures) must be removed by the caller first.
    """
    if target.shape != recon.shape:
        raise ValueError(f"target shape {target.shape} != reconstruction shape {recon.shape}")
    if not np.all(np.isfinite(recon)):
        raise ValueError("reconstruction contains NaN/inf: drop the failed chunks and report them")
    err = np.asarray(recon, np.float64) - np.asarray(target, np.float64)
    per_chunk = np.mean(err ** 2, axis=(1, 2))
    return {"mse": float(per_chunk.mean()), "mse_std": float(per_chunk.std()),
            "mse_median": float(np.median(per_chunk)), "mse_p99": float(np.percentile(per_chunk, 99)),
            "max_abs_err": float(np.abs(err).max())}


def compression_ratios(chunk_shape, tokens_per_chunk: float, bits_per_chunk: float) -> dict:
    """Both compression-ratio definitions for a chunk of shape (T, D):
    ratio_bits = raw float32 bits (32 * T * D) / token bits per chunk;
    ratio_tokens = 256-bin tokens per chunk (T * D, one per value) / tokens per chunk (FAST's)."""
    n = int(np.prod(chunk_shape))
    return {"compression_ratio_bits": 32.0 * n / bits_per_chunk,
            "compression_ratio_tokens": n / tokens_per_chunk}


def evaluate_codec(codec, test_norm: np.ndarray, test_raw: np.ndarray, denormalize) -> dict:
    """Encode and decode held-out chunks with a fitted codec and measure the error.

    test_norm: [B, T, D] normalized chunks (what the codec sees); test_raw: [B, T, D] the same
    chunks in raw action units; denormalize: maps normalized [B, T, D] arrays to raw units.
    Returns one rate-distortion point: tokens_per_chunk, bits_per_chunk, both compression
    ratios, mse / mse_std / max_abs_err (normalized units, over the chunks that decoded),
    mse_raw, decode_failures (chunks whose tokens did not decode; left out of the errors)
    and clipped_values (values outside the codec's range, clipped at encode).
    """
    tokens = codec.encode(test_norm)
    recon, failed = codec.decode(tokens)
    ok = ~failed
    if not ok.any():
        raise RuntimeError(f"{codec.name}: every one of {len(failed)} chunks failed to decode")
    budget = codec.budget(tokens)
    stats = error_stats(test_norm[ok], recon[ok])
    raw = error_stats(test_raw[ok], np.asarray(denormalize(recon[ok])))
    return {"method": codec.name, "tokens_per_chunk": budget.tokens_per_chunk,
            "bits_per_chunk": budget.bits_per_chunk,
            **compression_ratios(test_norm.shape[1:], budget.tokens_per_chunk, budget.bits_per_chunk),
            **stats, "mse_raw": raw["mse"], "max_abs_err_raw": raw["max_abs_err"],
            "decode_failures": int(failed.sum()), "num_chunks": int(len(failed)),
            "clipped_values": int(codec.last_clipped)}


@dataclass
class BaselineConfig:
    """Which operating points of each baseline to measure.

    dct_keeps: coefficients kept per dimension (None -> 1..T); fast_scales: FAST scales (each
    trains its own BPE); bin_counts: bins per value for per-dimension binning (256 is the
    OpenVLA setting, fewer bins trace its rate-distortion curve).
    """

    dct_keeps: tuple[int, ...] | None = None
    dct_bins: int = DEFAULT_NUM_BINS
    # a dense grid (x1.5 steps) so that every budget has a FAST point close above it
    fast_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.5, 7.0, 10.0, 15.0, 22.0, 33.0, 50.0, 75.0, 100.0)
    fast_vocab_size: int = FAST_DEFAULT_VOCAB
    bin_counts: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)

    def __post_init__(self):
        if self.dct_keeps is not None and (not self.dct_keeps or min(self.dct_keeps) < 1):
            raise ValueError(f"dct_keeps must be positive integers, got {self.dct_keeps}")
        if not self.fast_scales or min(self.fast_scales) <= 0:
            raise ValueError(f"fast_scales must be positive, got {self.fast_scales}")
        if not self.bin_counts or min(self.bin_counts) < 2:
            raise ValueError(f"bin_counts must be >= 2, got {self.bin_counts}")


def baseline_curves(train_norm, test_norm, test_raw, denormalize, config: BaselineConfig | None = None,
                    progress=None) -> dict:
    """Fit every baseline on training chunks and measure it on held-out chunks.

    train_norm: [M, T, D] normalized training chunks (fits DCT ranges and the FAST BPE);
    test_norm / test_raw: [B, T, D] held-out chunks, normalized and raw.
    Returns (curves, skipped): curves = {"dct": [point, ...], "fast": [...], "binning": [...]}
    with points from `evaluate_codec` plus the operating parameter ("keep", "scale" or
    "bins"), each list sorted by bits per chunk; skipped = operating points that could not be
    fit (with the reason), reported rather than dropped silently.
    """
    config = config or BaselineConfig()
    t = test_norm.shape[1]
    keeps = config.dct_keeps or tuple(range(1, t + 1))
    jobs = [("dct", "keep", k, DCTKeepK(k, config.dct_bins)) for k in keeps if k <= t]
    jobs += [("fast", "scale", s, FASTTokenizer(s, config.fast_vocab_size)) for s in config.fast_scales]
    jobs += [("binning", "bins", n, PerDimBinning(n)) for n in config.bin_counts]
    curves = {"dct": [], "fast": [], "binning": []}
    skipped = []
    for family, param, value, codec in (progress(jobs) if progress else jobs):
        try:
            codec.fit(train_norm)
        except ValueError as exc:  # e.g. a FAST scale whose alphabet exceeds the vocabulary
            skipped.append({"method": codec.name, param: value, "reason": str(exc)})
            continue
        point = {param: value, **evaluate_codec(codec, test_norm, test_raw, denormalize)}
        if family == "fast":
            point["vocab_size"] = codec.trained_vocab_size
        curves[family].append(point)
    for points in curves.values():
        points.sort(key=lambda p: p["bits_per_chunk"])
    return curves, skipped
