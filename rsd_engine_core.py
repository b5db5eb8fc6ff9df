"""Residual speculative decoding (RSD) over a layer-autoregressive token policy.

Decoding modes (codes ``[1, T', l]`` out, then the tokenizer turns them into actions):

- ``dense``: one main pass per layer, L passes.
- ``parallel``: the one-pass baseline policy (variant "parallel") predicts every layer at once.
- ``rsd``: the draft proposes layers 0..k-1 in one cheap pass (a chained draft: one small step
  per layer, each reading the codes proposed below it); ONE main pass over the ctx and
  code blocks 0..k verifies them all and yields the main policy's own prediction for the
  first rejected layer (or for layer k when all are accepted); the remaining layers are
  decoded densely, reusing the verified part of the key/value cache.
- ``adaptive``: dense, but stops adding layers once the main policy expects the next
  refinement to be small (stop rule ``expected_norm``: see ``expected_refinement``), or once a
  learned stop model predicts that the actions of the layers so far are within the threshold
  of those of all L (stop rule ``learned``: see ``LearnedStop``). A study tool, stop rule
  ``oracle``, stops at the first layer whose actions are in fact within the threshold of all
  L's: it knows the layers to come (``act`` decodes them densely first, untimed), so it shows
  what a perfect stop rule would give, in success and in latency, not something a robot can run.
- ``rsd+adaptive``: both.
- ``tree``: exact speculation over several candidates per layer (token-tree verification:
  SpecInfer, Miao et al. 2024; the tree chosen from the draft's confidence as in EAGLE-2, Li et
  al. 2024). The draft's C most probable codes of each of layers 0..k-1 (``top_candidates``)
  make a tree of code blocks: a candidate for layer l is a block of layer l + 1 below a block of
  layer l. At most C x k candidate blocks are kept: the chain of the draft's most probable codes
  (``rsd``'s proposal), then the most probable paths (``draft_tree``).
  ONE main pass verifies the whole tree, its tokens in the sequence dimension under an
  ancestor-only mask (``TokenPolicy.extend_tree``); from the root, the main policy's argmax of a
  block leads to the child carrying it, and the longest such path is kept, with the main
  policy's prediction for the layer after it; the rest is decoded densely, reusing the path's
  part of the key/value cache. With C = 1 the tree is ``rsd``'s chain of k proposed layers.
  Exact acceptance only.
- ``tree+adaptive``: both; the stop test runs on every layer of the kept path in turn, as dense
  decoding runs it, so it keeps the layers ``adaptive`` keeps.
- ``heads``: self-drafting (Medusa-style heads on the main policy: Cai et al. 2024;
  ``DraftHeads``). Every main pass also proposes: from the final hidden state of the last kept
  block (the block that predicted layer l) and the code chosen for l, the heads propose layers
  l+1..l+J; the next pass carries layer l's code and the J proposals as blocks l+1..l+J+1,
  accepts the longest prefix of proposals equal to the main policy's argmax (as ``rsd``'s exact
  acceptance), yields the main policy's own prediction for the layer after it, and the heads at
  the last kept block propose again. The first pass carries the ctx and block 0 alone (nothing
  to propose from yet), and a pass never carries a block past layer L - 1, so with proposals
  always accepted a chunk takes 1 + ceil((L - 1) / (J + 1)) passes instead of L. Exact
  acceptance only.
- ``heads+adaptive``: both; the stop test runs on every kept layer in turn.
- ``rsd+heads``, ``rsd+heads+adaptive``: ``heads`` whose first pass also verifies the draft's
  proposal for layers 0..k-1 (``rsd``'s), so the first pass is not spent on layer 0 alone; K
  is the layers proposed per pass, by the draft in the first pass and the heads after it (by
  default all the draft predicts, and all the heads' offsets). With every proposal accepted a
  chunk takes 1 + ceil((L - 1 - k) / (J + 1)) passes. Exact acceptance only.

A multi-token pass rounds differently from the one-block passes of dense decoding (other matmul
shapes, a longer masked attention row), and the dense passes after it read keys and values it
computed, so its logits and dense decoding's differ in the last bits, in proportion to the
logits' size. Exact speculation (``tree``, ``heads``, and ``rsd`` with ``exact`` acceptance) makes every
choice by an argmax whose top two logits are more than ``tie_margin`` x max(1, |top logit|) apart
at every position (``near_tie``); a choice within that margin of a tie is not trusted: the chunk is
then decoded again from scratch by dense decoding itself (``ChunkStats.fallbacks``), so its codes
are dense decoding's whenever the rounding differences stay under half the margin (float32: about
3e-7 of the largest logit in the tests, which also build near-ties into random models). Adaptive
depth's ``expected_norm`` stop signal is read off the same logits and guarded the same way: a signal
within the margin of its threshold sends the chunk back to dense decoding too (``near_threshold``).

Acceptance rules for proposed layers:

- ``exact``: greedy; a layer is accepted when the draft's codes equal the main policy's
  argmax at every latent position. The output equals dense greedy decoding exactly.
- ``sample``: speculative sampling (Leviathan et al. 2023; Chen et al. 2023) per latent
  position: accept d with probability min(1, p(d)/q(d)), otherwise resample from
  norm(max(0, p - q)). A layer whose positions are all accepted lets the next proposed layer
  be checked; the output is distributed exactly as sampling the main policy layer by layer.
- ``relaxed``: a proposed layer is accepted when the actions decoded with it differ from
  those decoded with the main policy's argmax for that layer by at most ``tolerance``
  (max abs, normalized action units).

Tokenizers: the policy predicts the first ``num_layers`` layers of a tokenizer whose T' codes of
a layer are parallel (encoder ``mlp``, or ``pca``: RVQ in the chunk's principal axes); any prefix
decodes. What a code adds to the latent is its layer's code vector, except with cell scales
(``pca``'s default): code k of layer l adds ``S_t * codebook_l[k]`` at position t, S_t the
running scale of the position, the product of the scales of its own codes of layers < l
(``RunningScale``). The engine carries S wherever it reads code vectors without decoding:
the ``expected_norm`` stop signal, the learned stop rule's features and relaxed acceptance's gaps.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cli
import policy_models as pm
from cli import arg
from policy_data import ActionHistory, obs_vector
from policy_models import DraftHeads, DraftModel, StopModel, TokenPolicy

MODES = ("dense", "parallel", "rsd", "adaptive", "rsd+adaptive", "tree", "tree+adaptive", "heads", "heads+adaptive",
         "rsd+heads", "rsd+heads+adaptive")
DRAFT_FIRST_MODES = ("rsd+heads", "rsd+heads+adaptive")  # the draft's proposal in the first pass, then the heads'
SPECULATIVE_MODES = ("rsd", "rsd+adaptive", "tree", "tree+adaptive") + DRAFT_FIRST_MODES  # the modes of a separate draft
TREE_MODES = ("tree", "tree+adaptive")
HEADS_MODES = ("heads", "heads+adaptive") + DRAFT_FIRST_MODES  # self-drafting heads on the main policy
ACCEPTANCE = ("exact", "sample", "relaxed")
STOP_RULES = ("expected_norm", "learned", "oracle")


# ----------------------------------------------------------------------------- mode specs


def split_spec(spec: str) -> tuple[str, str, int | None, int | None]:
    """'MODE[@ACCEPTANCE][:K][/C]' -> (mode, acceptance or '', k or None, c or None); a bad spec
    is a ValueError naming it and what is allowed. K: the layers a draft proposes (draft modes),
    or the heads per pass (heads modes; ``rsd+heads``: both)."""
    rest, slash, c = spec.partition("/")
    rest, colon, k = rest.partition(":")
    mode, _, acc = rest.partition("@")
    ok = (mode in MODES and (not acc or acc in ACCEPTANCE) and (not colon or k.isdigit())
          and (not colon or (int(k) >= 1 and mode in SPECULATIVE_MODES + HEADS_MODES))
          and (not slash or (c.isdigit() and int(c) >= 1 and mode in TREE_MODES)))
    if not ok:
        raise ValueError(f"--mode: {spec!r} is not MODE[@ACCEPTANCE][:K][/C] with MODE in {MODES}, ACCEPTANCE in "
                         f"{ACCEPTANCE}, K >= 1 layers proposed by the draft (speculative modes) or per pass by the "
                         f"heads (heads modes) and C >= 1 "
                         f"candidates per layer (tree modes only)")
    return mode, acc, int(k) if colon else None, int(c) if slash else None


def base_mode(spec: str) -> str:
    return spec.partition("/")[0].partition(":")[0].partition("@")[0]


def parse_modes(value: str, extra: tuple[str, ...] = ()) -> list[str]:
    """'all' (every mode), or a comma list of MODE[@ACCEPTANCE][:K][/C] specs and the ``extra`` names
    a caller allows (eval_libero.py: 'expert')."""
    if value == "all" and "all" not in extra:
        return list(MODES)
    specs = [v.strip() for v in value.split(",") if v.strip()]
    for spec in specs:
        if spec not in extra:
            split_spec(spec)
    if not specs or len(set(specs)) != len(specs):
        raise ValueError(f"--mode: give distinct mode specs, got {value!r}")
    return specs


def stop_rule_of(stop_model: str | None, oracle_stop: bool) -> str:
    """The adaptive modes' stop rule from --stop_model and --oracle_stop."""
    if stop_model and oracle_stop:
        raise ValueError(f"give --stop_model ({stop_model}) or --oracle_stop, not both")
    return "oracle" if oracle_stop else "learned" if stop_model else "expected_norm"


ORACLE_STOP_HELP = (
    "a study tool: the adaptive modes stop at the first layer (from --min_layers on) whose actions "
    "are within --adaptive_threshold (normalized units) of all layers', known from a dense decode "
    "of the chunk beforehand that is not timed; success and latency are then those of a perfect "
    "stop rule (exact acceptance only)")


@dataclass
class DecodingArgs:
    """The decoding flags of every script that runs the engine (a mode spec's @ACCEPTANCE, :K
    and /C override --acceptance, --k and --candidates for that mode)."""

    acceptance: str = arg("exact", "acceptance rule of the speculative modes", choices=list(ACCEPTANCE))
    k: int | None = arg(None, "layers the draft proposes (default: all it predicts); heads modes: layers the "
                              "heads propose per pass (default: all their offsets)")
    stop_model: str | None = arg(None, "a learned stop model (train_stop.py) for the adaptive modes: they stop "
                                       "once it predicts the actions within --adaptive_threshold (normalized "
                                       "units) of all layers' (default: the expected code norm rule)",
                                 metavar="PATH")
    oracle_stop: bool = arg(False, ORACLE_STOP_HELP)
    adaptive_threshold: float = arg(0.05, "adaptive modes stop once the expected refinement of a layer is at "
                                          "most this (with --stop_model: once the predicted action gap is; "
                                          "with --oracle_stop: once the true one is)")
    min_layers: int = arg(2, "adaptive modes keep at least this many layers")
    tolerance: float = arg(0.05, "relaxed acceptance: largest action change accepted (normalized units)")
    candidates: int = arg(2, "tree mode: candidates the draft proposes per layer (the tree keeps at most "
                             "candidates x k, the most probable paths first)")
    tie_margin: float = arg(1e-5, "exact speculation (tree, rsd with exact acceptance): a choice whose top two "
                                  "logits are closer than this times max(1, |top logit|) is not trusted to a "
                                  "multi-token pass; the chunk is decoded again densely")

    def check_decoding(self) -> None:
        cli.require(self.k is None or self.k >= 1, f"--k must be >= 1, got {self.k}")
        cli.require_positive("--adaptive_threshold", self.adaptive_threshold, allow_zero=True)
        cli.require_positive("--tolerance", self.tolerance, allow_zero=True)
        cli.require(self.min_layers >= 1, f"--min_layers must be >= 1, got {self.min_layers}")
        cli.require(self.candidates >= 1, f"--candidates must be >= 1, got {self.candidates}")
        cli.require_positive("--tie_margin", self.tie_margin, allow_zero=True)
        stop_rule_of(self.stop_model, self.oracle_stop)

    def engine_config(self, spec: str) -> "EngineConfig":
        mode, acceptance, k, c = split_spec(spec)
        # the tree and heads modes accept exactly: --acceptance speaks for the rsd modes
        acceptance = acceptance or ("exact" if mode in TREE_MODES + HEADS_MODES else self.acceptance)
        return EngineConfig(mode=mode, acceptance=acceptance, k=k or self.k,
                            adaptive_threshold=self.adaptive_threshold, min_layers=self.min_layers,
                            tolerance=self.tolerance, stop_rule=stop_rule_of(self.stop_model, self.oracle_stop),
                            candidates=c or self.candidates, tie_margin=self.tie_margin)


@dataclass
class ChunkStats:
    """What decoding one chunk cost and what the draft contributed."""

    main_passes: int = 0
    draft_passes: int = 0
    proposed: int = 0        # layers proposed by the draft
    accepted: int = 0        # of those, accepted
    layers: int = 0          # layers in the output code (< L when adaptive stops early)
    seconds: float = 0.0     # wall time of decoding + tokenizer decode
    # where that time went: main passes, the draft pass, the tokenizer decode (the rest is
    # the observation embedding and the engine's own work between passes)
    main_seconds: float = 0.0
    draft_seconds: float = 0.0
    decode_seconds: float = 0.0
    # exact speculation: 1 when a choice within tie_margin of a tie sent the chunk back to dense decoding
    fallbacks: int = 0


def time_split_ms(stats: list[ChunkStats]) -> dict:
    """Mean milliseconds per chunk in the main passes, the draft, the tokenizer decode and the
    rest (observation embedding, the engine's work between passes); the parts add up to the
    mean latency."""
    n = max(len(stats), 1)
    main, draft, dec, total = (1e3 * sum(getattr(s, f) for s in stats) / n
                               for f in ("main_seconds", "draft_seconds", "decode_seconds", "seconds"))
    return {"main": main, "draft": draft, "tokenizer_decode": dec, "other": total - main - draft - dec,
            "total": total}


def chunk_summary(stats: list[ChunkStats]) -> dict:
    """What decoding a list of chunks cost (non-empty): median and p90 latency, passes, layers,
    proposals and acceptance per chunk, and the mean time split (``time_split_ms``)."""
    seconds = [s.seconds for s in stats]
    proposed = sum(s.proposed for s in stats)
    return {
        "latency_ms_median": 1e3 * statistics.median(seconds),
        "latency_ms_p90": 1e3 * float(np.percentile(seconds, 90)),
        "main_passes_per_chunk": float(np.mean([s.main_passes for s in stats])),
        "draft_passes_per_chunk": float(np.mean([s.draft_passes for s in stats])),
        "layers_per_chunk": float(np.mean([s.layers for s in stats])),
        "proposed_layers_per_chunk": proposed / len(stats),
        "accepted_layers_per_chunk": float(np.mean([s.accepted for s in stats])),
        "acceptance_rate": sum(s.accepted for s in stats) / proposed if proposed else None,
        "fallbacks_per_chunk": float(np.mean([s.fallbacks for s in stats])),
        "time_split_ms_mean": time_split_ms(stats),
    }


@dataclass
class EngineConfig:
    mode: str = "dense"
    acceptance: str = "exact"
    k: int | None = None               # layers the draft proposes (default: all it predicts); heads
    #                                    modes: layers the heads propose per pass (default: all their offsets)
    adaptive_threshold: float = 0.0    # stop when the stop signal falls to or below this
    min_layers: int = 1                # adaptive never stops before this many layers
    tolerance: float = 0.05            # relaxed acceptance, normalized action units
    # the adaptive stop signal: "expected_norm" (the expected code norm of the layer just
    # decoded), "learned" (a StopModel's predicted action gap, normalized action units) or
    # "oracle" (the true action gap of the layers so far, from a dense decode beforehand: a study
    # tool, with exact acceptance only)
    stop_rule: str = "expected_norm"
    candidates: int = 2                # tree modes: candidates per proposed layer
    tie_margin: float = 1e-5           # exact speculation: least gap of the top two logits of a trusted choice,
    #                                    relative to max(1, |top logit|) (``near_tie``)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {ACCEPTANCE}, got {self.acceptance!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.min_layers < 1:
            raise ValueError(f"min_layers must be >= 1, got {self.min_layers}")
        if self.tolerance < 0 or self.adaptive_threshold < 0:
            raise ValueError("tolerance and adaptive_threshold must be >= 0")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {self.stop_rule!r}")
        if self.stop_rule == "oracle" and self.adaptive and self.acceptance != "exact":
            raise ValueError("the oracle stop rule knows the layers of dense greedy decoding: it needs "
                             f"exact acceptance, got {self.acceptance!r}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if not self.tie_margin >= 0:
            raise ValueError(f"tie_margin must be >= 0, got {self.tie_margin}")
        if self.tree and self.acceptance != "exact":
            raise ValueError(f"mode {self.mode!r} verifies a tree exactly: acceptance must be 'exact', "
                             f"got {self.acceptance!r}")
        if self.self_draft and self.acceptance != "exact":
            raise ValueError(f"mode {self.mode!r} verifies the heads' proposals exactly: acceptance must be "
                             f"'exact', got {self.acceptance!r}")

    @property
    def speculative(self) -> bool:
        return self.mode in SPECULATIVE_MODES

    @property
    def tree(self) -> bool:
        return self.mode in TREE_MODES

    @property
    def self_draft(self) -> bool:
        """The heads modes: the main policy's own heads propose at every pass."""
        return self.mode in HEADS_MODES

    @property
    def draft_first(self) -> bool:
        """``rsd+heads`` modes: the draft's proposal goes into the first pass."""
        return self.mode in DRAFT_FIRST_MODES

    @property
    def guarded(self) -> bool:
        """Exact speculation: its choices come from multi-token passes, and must be dense decoding's."""
        return self.tree or self.self_draft or (self.speculative and self.acceptance == "exact")

    @property
    def adaptive(self) -> bool:
        return self.mode == "adaptive" or self.mode.endswith("+adaptive")

    @property
    def sampling(self) -> bool:
        return self.acceptance == "sample"


class RunningScale:
    """S [1, T']: what the next layer's code vectors are multiplied by at each position of one
    chunk, the product of the cell scales of the position's codes so far (ones at layer 0), for
    a tokenizer whose codes carry cell scales (encoder 'pca'); ``value`` is None for one whose
    codes add their vectors as they are (encoder 'mlp'). ``push`` takes in each layer's kept
    codes, in order, as the stop tests receive them."""

    def __init__(self, engine: "RSDEngine"):
        self.table = engine.code_scales  # [L, vocab] or None
        self.value = (None if self.table is None
                      else torch.ones(1, engine.policy.config.latent_steps, device=engine.device))

    def push(self, layer: int, code: torch.Tensor) -> None:
        """The kept codes [1, T'] of layer ``layer``."""
        if self.table is not None:
            self.value = self.value * self.table[layer, code]


class LearnedStop:
    """The features a ``StopModel`` reads, built layer by layer as one chunk is decoded: the
    latent that the kept codes of layers 0..l sum to (what the tokenizer's decoder will read,
    [T' * C]), then a one-hot of l. Whether the layers after l will move the actions depends on
    where that latent sits for the decoder and on the residual its code path tends to leave;
    richer inputs (the policy's distribution over the layer's codes: expected code norm, entropy,
    top probability, and the last layer's of them) predicted no better on held-out states. The
    features are the same whether the layers came from dense decoding or from accepted
    proposals: training (``train_stop.py``) and the engine both build them here, one call per
    layer in order.
    """

    def __init__(self, engine: "RSDEngine"):
        self.engine = engine
        self.latent = torch.zeros(1, engine.code_vectors[0].shape[-1] * engine.policy.config.latent_steps,
                                  device=engine.device)
        self.layer = 0                     # the layer the next call must be for
        self.scale = RunningScale(engine)  # with cell scales, what the next layer's vectors are multiplied by

    @staticmethod
    def input_size(engine: "RSDEngine") -> int:
        c = engine.policy.config
        return c.latent_steps * engine.code_vectors.shape[-1] + c.num_layers

    def add(self, layer: int, code: torch.Tensor) -> None:
        """Take in the kept codes [1, T'] of layer ``layer`` (layers must come in order)."""
        if layer != self.layer:
            raise ValueError(f"stop features must be built layer after layer: expected layer {self.layer}, got {layer}")
        vectors = self.engine.code_vectors[layer, code[0]]  # [T', C]
        if self.scale.value is not None:
            vectors = vectors * self.scale.value[0, :, None]
        self.scale.push(layer, code)
        self.latent = self.latent + vectors.view(1, -1)
        self.layer = layer + 1

    def features(self, layer: int, code: torch.Tensor) -> torch.Tensor:
        """The kept codes [1, T'] of layer ``layer`` -> the model's input [1, in_dim]."""
        self.add(layer, code)
        onehot = torch.zeros(1, self.engine.policy.config.num_layers, device=self.engine.device)
        onehot[0, layer] = 1
        return torch.cat([self.latent, onehot], 1)

    def predicted_log_gap(self, layer: int, code: torch.Tensor) -> float:
        """The stop model's predicted log(gap + gap_eps) of stopping after this layer (its
        folded form, ``FusedStop``)."""
        self.add(layer, code)
        return self.engine.stop_fused(self.latent, layer)

    def predicted_gap(self, layer: int, code: torch.Tensor) -> float:
        return math.exp(self.predicted_log_gap(layer, code)) - self.engine.stop_model.config.gap_eps


def near_tie(logits: torch.Tensor, margin: float) -> bool:
    """logits [1, T', vocab]: whether at some position the top two logits are within ``margin`` x
    max(1, |top logit|), so that a pass rounding differently could pick the other one."""
    return bool(tied(logits.topk(2, -1).values, margin).any())


def near_threshold(signal: float, threshold: float, margin: float) -> bool:
    """Whether a stop signal is within ``margin`` x max(1, threshold) of its threshold (``stopper``)."""
    return abs(signal - threshold) <= margin * max(1.0, abs(threshold))


def tied(top: torch.Tensor, margin: float) -> torch.Tensor:
    """top [..., 2]: the two largest logits of each position -> [...] bool, within the tie margin."""
    return top[..., 0] - top[..., 1] <= margin * top[..., 0].abs().clamp(min=1.0)


def top_candidates(logits: torch.Tensor, c: int) -> list[tuple[float, tuple[int, ...]]]:
    """The c most probable codes of one layer under a draft's logits [T', vocab], the positions
    independent: [(log-probability, codes of the T' positions)], best first; codes that cannot
    be emitted (-inf) are never proposed. The c best of a product of distributions: a heap over
    each position's rank among its own c best."""
    values, index = torch.log_softmax(logits.float(), -1).topk(min(c, logits.shape[-1]), -1)
    return best_products(values.tolist(), index.tolist(), c)


def best_products(values: list, index: list, c: int) -> list[tuple[float, tuple[int, ...]]]:
    """``top_candidates`` from each position's best log-probabilities ``values`` [T'][c'], best
    first, and their codes ``index`` [T'][c']."""
    first = (0,) * len(values)
    heap, seen, out = [(-sum(v[0] for v in values), first)], {first}, []
    while heap and len(out) < c:
        neg, ranks = heapq.heappop(heap)
        if neg == math.inf:
            break
        out.append((-neg, tuple(index[t][r] for t, r in enumerate(ranks))))
        for t, r in enumerate(ranks):
            nxt = ranks[:t] + (r + 1,) + ranks[t + 1:]
            if r + 1 < len(values[t]) and nxt not in seen:
                seen.add(nxt)
                heapq.heappush(heap, (neg + values[t][r] - values[t][r + 1], nxt))
    return out


class DraftTree:
    """A tree of code blocks for ``TokenPolicy.extend_tree``: block 0 is the root (layer 0, no
    codes); a block added below a parent carries candidate codes of the parent's layer and is a
    block of the next layer; ``children[node]`` maps the codes a block below ``node`` carries to
    that block."""

    def __init__(self, latent_steps: int, device):
        self.device = device
        self.parents, self.layers = [-1], [0]  # each block's parent and layer
        self.node_codes: list[tuple[int, ...]] = [(0,) * latent_steps]
        self.children: list[dict[tuple[int, ...], int]] = [{}]

    @property
    def size(self) -> int:
        return len(self.parents)

    def add(self, parent: int, layer: int, codes: tuple[int, ...]) -> int:
        """A block below ``parent`` carrying ``codes`` of layer ``layer`` (the parent's); its index."""
        self.parents.append(parent)
        self.layers.append(layer + 1)
        self.node_codes.append(codes)
        self.children.append({})
        self.children[parent][codes] = self.size - 1
        return self.size - 1

    def finish(self) -> "DraftTree":
        """Sets ``codes`` [1, T', n], what ``extend_tree`` reads with ``layers`` and ``parents``."""
        self.codes = torch.tensor(self.node_codes, device=self.device).T[None]
        return self


class RSDEngine:
    """Decodes action chunks with a main policy, an optional draft, optional self-drafting heads
    and a tokenizer (batch 1)."""

    def __init__(self, policy: TokenPolicy, tokenizer, draft: DraftModel | None = None,
                 parallel_policy: TokenPolicy | None = None, stop_model: StopModel | None = None,
                 device="cpu", heads: DraftHeads | None = None):
        self.device = torch.device(device)
        on = lambda m: None if m is None else m.to(self.device).eval()  # noqa: E731
        self.policy = on(policy)
        self.stop_model = on(stop_model)
        self.stop_fused = None if stop_model is None else self.stop_model.fused()
        self.tokenizer = on(tokenizer)
        self.draft = on(draft)
        # the draft runs in its folded inference form (the same function in fewer operations)
        self.draft_fn = None if draft is None else self.draft.fused()
        self.parallel_policy = on(parallel_policy)
        self.heads = on(heads)  # proposes through its folded form (``heads_propose``)
        c = policy.config
        if policy.config.variant != "ar":
            raise ValueError("the main policy must be the layer-autoregressive variant 'ar'")
        tc = tokenizer.config
        if tc.encoder == "none":
            raise ValueError("the engine needs a tokenizer whose T' codes of a layer are parallel (encoder 'mlp' "
                             "or 'pca'); encoder 'none' codes its whole-chunk layers in T' sequential stages")
        sizes = tuple(tokenizer.layer_codebook_sizes()[: c.num_layers])
        if tc.latent_steps != c.latent_steps or c.num_layers > tc.num_layers or sizes != c.codebook_sizes:
            raise ValueError(f"the policy (T'={c.latent_steps}, {c.num_layers} layers of {c.codebook_sizes} codes) "
                             f"does not predict the first layers of this tokenizer (T'={tc.latent_steps}, "
                             f"{tc.num_layers} layers of {tuple(tokenizer.layer_codebook_sizes())} codes)")
        if draft is not None and draft.config.num_layers > c.num_layers:
            raise ValueError(f"draft predicts {draft.config.num_layers} layers, policy has {c.num_layers}")
        if heads is not None:
            hc = heads.config
            if (hc.d_model, hc.latent_steps, hc.num_layers, tuple(hc.codebook_sizes)) != (
                    c.d_model, c.latent_steps, c.num_layers, c.codebook_sizes):
                raise ValueError(f"the heads read a policy of width {hc.d_model}, T'={hc.latent_steps}, "
                                 f"{hc.num_layers} layers of {tuple(hc.codebook_sizes)} codes; this policy is "
                                 f"{c.d_model}, T'={c.latent_steps}, {c.num_layers} layers of {c.codebook_sizes}")
        # the policy's layers' code vectors [L, vocab, C] (a snapshot of the frozen tokenizer's
        # first L layers; rows past a layer's codebook stay zero) and their norms [L, vocab]
        vectors = torch.zeros(c.num_layers, c.vocab, tc.quantizer_dim, device=self.device)
        for l, layer in enumerate(tokenizer.quantizer.layers[: c.num_layers]):
            with torch.no_grad():
                vectors[l, : layer.codebook_size] = layer.lookup(torch.arange(layer.codebook_size, device=self.device))
        self.code_vectors = vectors
        self.code_norms = vectors.norm(dim=-1)
        # with cell scales (encoder 'pca'), what code k of layer l multiplies its position's running
        # scale by [L, vocab] (``RunningScale``); None: every code adds its vector as it is
        self.code_scales = None
        if tc.cell_scale:
            scales = torch.ones(c.num_layers, c.vocab, device=self.device)
            scales[:, : tc.codebook_size] = tokenizer.quantizer.scales[: c.num_layers].to(self.device)
            self.code_scales = scales
        if stop_model is not None and stop_model.config.in_dim != LearnedStop.input_size(self):
            raise ValueError(f"the stop model reads {stop_model.config.in_dim} features, this policy and "
                             f"tokenizer give {LearnedStop.input_size(self)}")

    # ------------------------------------------------------------------ helpers

    @property
    def heads(self) -> DraftHeads | None:
        return self._heads

    @heads.setter
    def heads(self, heads) -> None:
        """Self-drafting heads; ``DraftHeads`` propose through their folded inference form (a
        snapshot: set the heads again after changing their weights), anything else with a
        ``propose(hidden, code, layer, n)`` (perfect heads in the benchmark) as it is."""
        self._heads = heads
        self.heads_propose = (None if heads is None else
                              heads.fused().propose if isinstance(heads, DraftHeads) else heads.propose)

    def _inputs(self, obs: np.ndarray, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One state on the engine's device: obs [1, obs_dim], task [1]."""
        return (torch.as_tensor(obs, dtype=torch.float32, device=self.device)[None],
                torch.tensor([task], device=self.device))

    def _sync(self) -> None:
        """A wall time on CUDA needs the queued kernels finished (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def expected_refinement(self, logits: torch.Tensor, layer: int, scale: torch.Tensor | None = None) -> float:
        """The main policy's expected size of layer ``layer``'s refinement:
        max over positions t of S_t E_{c ~ p_t}[||e_layer(c)||], p = softmax(logits [1, T', vocab]),
        S [1, T'] the positions' running scale before the layer (``RunningScale``; None: 1).

        Residual layers shrink with depth, so once the refinement a layer adds is expected
        to be small, the layers after it change the action less still.
        """
        p = torch.softmax(logits.float(), -1)
        expected = (p * self.code_norms[layer]).sum(-1)  # [1, T']
        if scale is not None:
            expected = expected * scale
        return float(expected.max())

    def scales_before(self, codes: torch.Tensor) -> torch.Tensor | None:
        """codes [1, T', l] -> the running scale of every position before each of the l layers
        [1, T', l], as ``RunningScale`` builds it while decoding (the same products, in the same
        order), or None for a tokenizer without cell scales."""
        if self.code_scales is None:
            return None
        running, before = RunningScale(self), []
        for l in range(codes.shape[-1]):
            before.append(running.value)
            running.push(l, codes[..., l])
        return torch.stack(before, -1)

    def expected_refinements(self, logits: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
        """The ``expected_norm`` rule's signal after every layer of a dense trace (logits
        [L, 1, T', vocab], codes [1, T', L]: ``dense_trace``), as the engine computes it while
        decoding: [L]."""
        scale = self.scales_before(codes)
        return np.array([self.expected_refinement(logits[l], l, None if scale is None else scale[..., l])
                         for l in range(len(logits))])

    @torch.no_grad()
    def dense_trace(self, obs: np.ndarray, task: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Dense greedy decoding of one state, every layer, and what stopping early would cost:
        (logits [L, 1, T', vocab] of each layer, codes [1, T', L], the action gap of every
        prefix [L]: the max abs difference, normalized action units, between the actions of the
        first n layers and of all L at index n - 1, so the last is 0)."""
        L = self.policy.config.num_layers
        o, t = self._inputs(obs, task)
        cache, ctx = self.policy.new_cache(), self.policy.embed_obs(o, t)
        logits, codes = [], []
        for l in range(L):
            prev = codes[-1][..., None] if l else None
            logits.append(self.policy.extend(cache, l, 1, prev, ctx if l == 0 else None)[:, :, 0])
            codes.append(logits[-1].argmax(-1))
        codes = torch.stack(codes, -1)
        tok = self.tokenizer
        actions = torch.stack([tok.normalize(tok.decode(codes[..., :n], check=False))[0] for n in range(1, L + 1)])
        return torch.stack(logits), codes, (actions - actions[-1]).abs().amax(dim=(1, 2)).cpu().numpy()

    def _pick(self, logits: torch.Tensor, cfg: EngineConfig, gen) -> torch.Tensor:
        """logits [1, T', vocab] -> codes [1, T']: argmax, or a sample when sampling."""
        if cfg.sampling:  # drawn on the CPU, where the generator lives
            p = torch.softmax(logits.float(), -1).cpu()
            return torch.multinomial(p.view(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1]).to(logits.device)
        return logits.argmax(-1)

    def draft_proposal(self, obs, task, ctx, k: int, pick=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's proposal for layers 0..k-1: (logits [1, T', k, vocab], codes [1, T', k]);
        ``pick`` chooses each layer's codes from its logits (argmax by default). The embedding
        draft reads the ctx embedding the main policy needs anyway; the obs draft reads the
        normalized observation. A chained draft conditions each layer on the codes picked below it."""
        return self.draft_fn.propose(*self._draft_inputs(obs, task, ctx), k, pick)

    def _draft_inputs(self, obs, task, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the draft reads: the flattened ctx embedding, or the normalized observation and task."""
        if self.draft.config.source == "embedding":
            return ctx.flatten(1), None
        return self.policy.obs_encoder.normalizer(obs), task

    def stopper(self, cfg: EngineConfig, oracle_gaps: np.ndarray | None = None, guarded: bool = False):
        """A new chunk's stop test ``stop(logits [1, T', vocab], layer, code [1, T']) -> bool``,
        called once for every decoded layer, in order, with the main policy's logits for the
        layer and the codes kept for it: whether to stop after that layer. The oracle rule reads
        ``oracle_gaps`` [L], the chunk's prefix gaps from ``dense_trace``.

        ``guarded`` (exact speculation, whose logits come from multi-token passes): the
        ``expected_norm`` rule, the one that reads the logits, returns None instead of a decision
        when its signal is within ``cfg.tie_margin`` x max(1, threshold) of the threshold, where
        float rounding could decide differently from dense decoding's passes (``near_threshold``).
        The learned and oracle rules read only the codes kept and need no guard."""
        if not cfg.adaptive:
            return lambda logits, layer, code: False
        if cfg.stop_rule == "oracle":
            if oracle_gaps is None:
                raise ValueError("the oracle stop rule needs the chunk's prefix gaps (dense_trace; "
                                 "act computes them before decoding, untimed)")
            return lambda logits, layer, code: (layer + 1 >= cfg.min_layers
                                                and float(oracle_gaps[layer]) <= cfg.adaptive_threshold)
        if cfg.stop_rule == "learned":
            if self.stop_model is None:
                raise ValueError("stop rule 'learned' needs a stop model (train_stop.py; --stop_model)")
            learned = LearnedStop(self)
            limit = math.log(cfg.adaptive_threshold + self.stop_model.config.gap_eps)

            def stop(logits, layer, code):
                if layer + 1 < cfg.min_layers:  # its codes still go into the features
                    learned.add(layer, code)
                    return False
                return learned.predicted_log_gap(layer, code) <= limit
            return stop
        running = RunningScale(self)

        def stop(logits, layer, code):
            scale = running.value  # before this layer
            running.push(layer, code)
            if layer + 1 < cfg.min_layers:
                return False
            signal = self.expected_refinement(logits, layer, scale)
            if guarded and near_threshold(signal, cfg.adaptive_threshold, cfg.tie_margin):
                return None
            return signal <= cfg.adaptive_threshold
        return stop

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_codes(self, obs: torch.Tensor, task: torch.Tensor, cfg: EngineConfig,
                     gen: torch.Generator | None = None,
                     oracle_gaps: np.ndarray | None = None) -> tuple[torch.Tensor, ChunkStats]:
        """obs [1, obs_dim], task [1] -> codes [1, T', l] and the chunk's statistics
        (``oracle_gaps``: see ``stopper``)."""
        if obs.shape[0] != 1:
            raise ValueError(f"the engine decodes one chunk at a time (batch 1), got batch {obs.shape[0]}")
        stats = ChunkStats()
        if cfg.mode == "parallel":
            if self.parallel_policy is None:
                raise ValueError("mode 'parallel' needs a parallel-variant policy checkpoint")
            t0 = time.perf_counter()
            logits = self.parallel_policy(obs, task)  # [1, T', L, vocab]
            self._sync()
            stats.main_seconds += time.perf_counter() - t0
            stats.main_passes = 1
            codes = torch.stack([self._pick(logits[:, :, l], cfg, gen)
                                 for l in range(logits.shape[2])], -1)
            stats.layers = codes.shape[-1]
            return codes, stats

        ctx = self.policy.embed_obs(obs, task)
        cache = self.policy.new_cache()
        stop = self.stopper(cfg, oracle_gaps, guarded=cfg.guarded)
        codes: list[torch.Tensor] = []   # each [1, T']
        stopped = False
        if cfg.self_draft:
            codes = self._self_draft(obs, task, ctx, cache, cfg, stats, stop)
        else:
            if cfg.tree:
                codes, stopped = self._verify_tree(obs, task, ctx, cache, cfg, stats, stop)
            elif cfg.speculative:
                codes, stopped = self._speculate(obs, task, ctx, cache, cfg, gen, stats, stop)
            if codes:
                ctx = None  # the ctx is in the cache now
            if codes is not None and not stopped:
                codes = self._decode_layers(cache, ctx, codes, cfg, gen, stats, stop, guarded=cfg.guarded)
        if codes is None:  # a near-tie after a multi-token pass (a choice, or a stop signal near its threshold):
            #                decode the chunk again as dense decoding does
            stats.fallbacks = 1
            codes = self._decode_layers(self.policy.new_cache(), self.policy.embed_obs(obs, task), [], cfg, gen,
                                        stats, self.stopper(cfg, oracle_gaps), guarded=False)
        stats.layers = len(codes)
        return torch.stack(codes, -1), stats

    def _decode_layers(self, cache, ctx, codes: list, cfg, gen, stats, stop, guarded: bool) -> list | None:
        """Dense decoding of the layers after ``codes`` (one main pass each, the ctx first when
        given), until layer L - 1 or the stop test; the codes of every layer. ``guarded``: None
        as soon as a layer's choice is within ``cfg.tie_margin`` of a tie (``near_tie``) or the
        stop test cannot decide (``stopper``'s guard)."""
        L = self.policy.config.num_layers
        while len(codes) < L:
            layer = len(codes)
            prev = codes[-1][..., None] if layer > 0 else None
            t0 = time.perf_counter()
            logits = self.policy.extend(cache, layer, 1, prev, ctx)[:, :, 0]
            self._sync()
            stats.main_seconds += time.perf_counter() - t0
            ctx = None
            stats.main_passes += 1
            if guarded and near_tie(logits, cfg.tie_margin):
                return None
            codes.append(self._pick(logits, cfg, gen))
            done = stop(logits, layer, codes[-1])
            if done is None:
                return None
            if done:
                break
        return codes

    def draft_tree(self, obs, task, ctx, k: int, c: int) -> "DraftTree":
        """The tree mode's proposal for layers 0..k-1: a ``DraftTree`` of at most c x k candidate
        blocks below the root (block 0). Each block offers the c most probable codes of its layer
        (``top_candidates``; a chained draft's given the codes of the block's path) as candidates
        for blocks below it. First the chain of every layer's most probable codes (``rsd``'s
        proposal, so the tree accepts at least what ``rsd`` does), then the most probable paths
        among the candidates offered (EAGLE-2's dynamic tree) until the budget is spent. The
        draft's probabilities only choose the tree; the main policy's verification decides the codes."""
        draft = self.draft_fn
        chained = bool(getattr(self.draft.config, "chained", False))
        if chained:
            z = draft._trunk(*self._draft_inputs(obs, task, ctx))
            candidates = lambda z, layer: top_candidates(draft._step(z, layer)[0], c)  # noqa: E731
        else:
            per_layer = []
            if k:  # every layer's best codes per position in one go: [T', k, c']
                logits = self.draft_proposal(obs, task, ctx, k)[0][0]  # [T', k, vocab]
                values, index = torch.log_softmax(logits.float(), -1).topk(min(c, logits.shape[-1]), -1)
                values, index = values.transpose(0, 1).tolist(), index.transpose(0, 1).tolist()  # [k][T'][c']
                per_layer = [best_products(v, i, c) for v, i in zip(values, index)]
            z, candidates = None, (lambda z, layer: per_layer[layer])
        below = (lambda z, layer, code: draft._add_codes(z, layer, torch.tensor([code], device=self.device))
                 if chained else None)
        tree = DraftTree(self.policy.config.latent_steps, self.device)
        # offered candidates: (-log p of the path, order, parent block, layer of the codes, codes, parent's draft state)
        heap, order = [], itertools.count()
        node, path_lp = 0, 0.0
        for layer in range(k):  # the chain
            (lp, code), *rest = candidates(z, layer)
            for lp_other, other in rest:
                heapq.heappush(heap, (-(path_lp + lp_other), next(order), node, layer, other, z))
            node, path_lp = tree.add(node, layer, code), path_lp + lp
            z = below(z, layer, code) if layer + 1 < k else None
        while heap and tree.size - 1 < c * k:
            neg, _, parent, layer, code, z = heapq.heappop(heap)
            node = tree.add(parent, layer, code)
            if layer + 1 < k:
                z_node = below(z, layer, code)
                for lp, child in candidates(z_node, layer + 1):
                    heapq.heappush(heap, (neg - lp, next(order), node, layer + 1, child, z_node))
        return tree.finish()

    def _verify_tree(self, obs, task, ctx, cache, cfg, stats, stop) -> tuple[list | None, bool]:
        """Draft tree + one main pass over it (modes ``tree``, ``tree+adaptive``). Returns (the codes
        of layers 0..j, stop flag): the main policy's argmax at each block of the longest path it
        agrees with, the last being its prediction for the layer after the path, cut after the
        first layer whose stop test says stop; the cache keeps the ctx and that path. (None, False)
        when a choice on the path is within ``cfg.tie_margin`` of a tie, or its stop test cannot
        decide (``stopper``)."""
        if self.draft is None:
            raise ValueError(f"mode {cfg.mode!r} needs a draft model")
        L = self.policy.config.num_layers
        # a candidate for layer l is a block of layer l + 1: the last layer's needs no block
        k = min(cfg.k or self.draft.config.num_layers, self.draft.config.num_layers, L - 1)
        t0 = time.perf_counter()
        tree = self.draft_tree(obs, task, ctx, k, cfg.candidates)
        self._sync()
        stats.draft_seconds += time.perf_counter() - t0
        stats.draft_passes += 1
        t0 = time.perf_counter()
        logits = self.policy.extend_tree(cache, tree.layers, tree.parents, tree.codes, ctx)  # [1, T', n, vocab]
        self._sync()
        stats.main_seconds += time.perf_counter() - t0
        stats.main_passes += 1
        stats.proposed = k
        # every block's argmax and whether it is within the margin of a tie, read in one go
        top = logits[0].topk(2, -1)  # [T', n, 2]
        best = top.indices[..., 0].T.tolist()  # [n][T']
        near = tied(top.values, cfg.tie_margin).any(0).tolist()  # [n]
        path, stopped = [0], False
        while True:
            if near[path[-1]]:
                return None, False
            code = top.indices[:, path[-1], 0][None]  # [1, T']: the main policy's choice for this layer
            done = stop(logits[:, :, path[-1]], len(path) - 1, code)
            if done is None:
                return None, False
            if done:
                stopped = True
                break
            child = tree.children[path[-1]].get(tuple(best[path[-1]]))
            if child is None:
                break
            path.append(child)
        stats.accepted = len(path) - 1
        self.policy.keep_path(cache, tree.size, path)
        return list(top.indices[..., 0][None, :, path].unbind(-1)), stopped  # the path's codes [1, T'] per layer

    def _self_draft(self, obs, task, ctx, cache, cfg, stats, stop) -> list | None:
        """The heads modes: every pass verifies the heads' proposals of the pass before and proposes
        again; the first pass verifies the draft's proposal for layers 0..k-1 in the ``rsd+heads``
        modes, and nothing in the others. The codes of every layer (until L - 1 or the stop test),
        or None when a choice is within ``cfg.tie_margin`` of a tie or the stop test cannot decide (the
        passes carry several blocks, or read a cache such passes wrote: every choice and stop
        signal is guarded, as after ``_speculate``).

        A pass over blocks b..b+n carries layer b - 1's code in block b (the main policy's own
        choice; none at b = 0) and the proposal for layers b..b+n-1 in blocks b+1..b+n;
        block b + i predicts layer b + i. The accepted prefix of a proposals, then the main
        policy's prediction for the layer after it, are kept (``_accept_greedy``: blocks b..b+a
        had right inputs); the cache keeps those blocks, and the heads read the last one's hidden
        state and chosen code to propose layers b+a+1.. (at most J, and no block past layer L - 1)."""
        if self.heads is None:
            raise ValueError(f"mode {cfg.mode!r} needs self-drafting heads (--heads)")
        L = self.policy.config.num_layers
        J = min(cfg.k or self.heads.config.offsets, self.heads.config.offsets)
        codes: list[torch.Tensor] = []
        proposal = None  # [1, T', n]: the proposed codes for layers len(codes)..len(codes)+n-1
        if cfg.draft_first:
            if self.draft is None:
                raise ValueError(f"mode {cfg.mode!r} needs a draft model")
            t0 = time.perf_counter()
            proposal = self.draft_proposal(obs, task, ctx, min(cfg.k or L, self.draft.config.num_layers, L - 1))[1]
            self._sync()
            stats.draft_seconds += time.perf_counter() - t0
            stats.draft_passes += 1
        while len(codes) < L:
            b = len(codes)
            n = 0 if proposal is None else proposal.shape[-1]
            # block b carries layer b - 1's code (block 0 carries none: the ctx comes before it)
            prev = (torch.cat([codes[-1][..., None] if b else torch.zeros_like(proposal[..., :1])]
                              + ([proposal] if n else []), -1) if b or n else None)
            t0 = time.perf_counter()
            logits, hidden = self.policy.extend(cache, b, 1 + n, prev, ctx, hidden=True)  # [1, T', 1 + n, .]
            self._sync()
            stats.main_seconds += time.perf_counter() - t0
            stats.main_passes += 1
            ctx = None
            stats.proposed += n
            kept, accepted = (self._accept_greedy(logits, proposal, n, cfg) if n
                              else ([logits[:, :, 0].argmax(-1)], 0))
            for i, code in enumerate(kept):  # guarded choices and the stop test, layer after layer
                if near_tie(logits[:, :, i], cfg.tie_margin):
                    return None
                codes.append(code)
                done = stop(logits[:, :, i], b + i, code)
                if done is None:
                    return None
                if done:
                    stats.accepted += min(accepted, i + 1)
                    return codes
            stats.accepted += accepted
            self.policy.keep_blocks(cache, len(codes))  # blocks after the last kept one read rejected proposals
            last = len(codes) - 1
            n_next = min(J, L - 2 - last)
            proposal = None
            if n_next >= 1:
                t0 = time.perf_counter()
                proposal = self.heads_propose(hidden[:, :, len(kept) - 1], codes[-1], last, n_next)
                self._sync()
                stats.draft_seconds += time.perf_counter() - t0
                stats.draft_passes += 1
        return codes

    def _speculate(self, obs, task, ctx, cache, cfg, gen, stats, stop):
        """Draft pass + one verifying main pass. Returns (codes of layers 0..j, stop flag); with
        exact acceptance, (None, False) when a kept layer's choice is within ``cfg.tie_margin`` of
        a tie."""
        if self.draft is None:
            raise ValueError(f"mode {cfg.mode!r} needs a draft model")
        L = self.policy.config.num_layers
        k = min(cfg.k or self.draft.config.num_layers, self.draft.config.num_layers, L)
        t0 = time.perf_counter()
        pick = (lambda logits: self._pick(logits, cfg, gen)) if cfg.sampling else None
        q_logits, proposal = self.draft_proposal(obs, task, ctx, k, pick)  # [1, T', k, V], [1, T', k]
        self._sync()
        stats.draft_seconds += time.perf_counter() - t0
        stats.draft_passes += 1
        n_verify = min(k + 1, L)
        prev = torch.cat([torch.zeros_like(proposal[..., :1]), proposal[..., : n_verify - 1]], -1)
        t0 = time.perf_counter()
        p_logits = self.policy.extend(cache, 0, n_verify, prev, ctx)  # [1, T', n_verify, V]
        self._sync()
        stats.main_seconds += time.perf_counter() - t0
        stats.main_passes += 1
        stats.proposed = k

        if cfg.sampling:
            codes, accepted = self._accept_sampled(p_logits, q_logits, proposal, k, cfg, gen)
        else:
            codes, accepted = self._accept_greedy(p_logits, proposal, k, cfg)
        # adaptive depth: the stop test of every kept layer in turn, as dense decoding makes it
        stopped = False
        for l, code in enumerate(codes):
            if cfg.guarded and near_tie(p_logits[:, :, l], cfg.tie_margin):
                return None, False
            done = stop(p_logits[:, :, l], l, code)
            if done is None:
                return None, False
            if done:
                codes, stopped = codes[: l + 1], True
                break
        stats.accepted += min(accepted, len(codes))
        # blocks 0..len(codes)-1 had accepted inputs; later blocks read rejected proposals
        self.policy.keep_blocks(cache, len(codes))
        return codes, stopped

    def _accept_greedy(self, p_logits, proposal, k, cfg):
        """exact / relaxed: every proposed layer tested at once. Up to the first rejection the
        accepted prefix is the proposal itself, so the main policy's argmax of the verify pass
        and (relaxed) one batched decode of the prefixes decide every layer.
        Returns (codes of layers 0..j: the accepted proposals, then the main policy's own
        prediction for the first rejected layer or, all accepted, for layer k; the number
        accepted)."""
        main = p_logits.argmax(-1)  # [1, T', n_verify]
        ok = (main[..., :k] == proposal).all(1)[0]  # [k]: the whole layer agrees
        if cfg.acceptance == "relaxed" and not bool(ok.all()):
            ok = ok | (self.relaxed_gaps(proposal, main[..., :k]) <= cfg.tolerance)
        codes: list[torch.Tensor] = []
        for l, accepted in enumerate(ok.tolist()):
            if not accepted:
                codes.append(main[..., l])  # the main policy's own prediction for the layer
                return codes, l
            codes.append(proposal[..., l])
        if k < main.shape[-1]:  # every proposal accepted: the verify pass predicted layer k for free
            codes.append(main[..., k])
        return codes, k

    def _accept_sampled(self, p_logits, q_logits, proposal, k, cfg, gen):
        """Speculative sampling, layer by layer (see ``_accept``); returns as ``_accept_greedy``."""
        codes: list[torch.Tensor] = []
        for l in range(p_logits.shape[2]):
            p_l = p_logits[:, :, l]
            if l == k:  # every proposal accepted: the verify pass predicted layer k for free
                codes.append(self._pick(p_l, cfg, gen))
                break
            ok, chosen = self._accept(p_l, q_logits[:, :, l], proposal[..., l], cfg, gen)
            codes.append(chosen)
            if not ok:
                return codes, l
        return codes, k

    def _accept(self, p_logits, q_logits, d, cfg, gen):
        """Speculative sampling of proposed codes d [1, T'] for one layer -> (accepted?, codes
        for the layer), independently at each latent position."""
        device = d.device  # the draws run on the CPU, where the generator lives
        p = torch.softmax(p_logits.float(), -1)[0].cpu()  # [T', V]
        q = torch.softmax(q_logits.float(), -1)[0].cpu()
        d = d.cpu()
        idx = d[0][:, None]
        ratio = (p.gather(1, idx) / q.gather(1, idx).clamp(min=1e-30)).squeeze(1)
        u = torch.rand(ratio.shape, generator=gen)
        keep = u < ratio
        if bool(keep.all()):
            return True, d.to(device)
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum(-1, keepdim=True).clamp(min=1e-30)
        resampled = torch.multinomial(residual, 1, generator=gen).squeeze(1)
        return False, torch.where(keep, d[0], resampled)[None].to(device)

    @torch.no_grad()
    def relaxed_gaps(self, proposal: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """proposal, main: codes [1, T', k] -> [k]: for each layer l, the max abs difference
        (normalized action units) between decoding proposal[..., :l+1] and proposal[..., :l]
        followed by main[..., l], i.e. relaxed acceptance's test of layer l when the layers
        below it were accepted as proposed. All 2k prefixes in one decoder pass."""
        k = proposal.shape[-1]
        layer = torch.arange(k, device=proposal.device)
        a = self.code_vectors[layer, proposal[0]]  # [T', k, C]: the proposal's code vectors
        b = self.code_vectors[layer, main[0]]
        scale = self.scales_before(proposal)  # below layer l the codes are the proposal's
        if scale is not None:
            a, b = a * scale[0, ..., None], b * scale[0, ..., None]
        below = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1].cumsum(1)], 1)  # layers < l
        latents = torch.cat([below + a, below + b], 1).transpose(0, 1)  # [2k, T', C]
        actions = self.tokenizer.decode_latent(latents)  # [2k, T, D]
        return (actions[:k] - actions[k:]).abs().amax(dim=(1, 2))

    def action_gap(self, prefix: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> float:
        """Max abs difference (normalized action units) between decoding prefix+a and prefix+b."""
        return float(self.relaxed_gaps(torch.stack([*prefix, a], -1), torch.stack([*prefix, b], -1))[-1])

    # ------------------------------------------------------------------ actions
    @torch.no_grad()
    def act(self, obs: np.ndarray, task: int, cfg: EngineConfig,
            gen: torch.Generator | None = None) -> tuple[np.ndarray, ChunkStats, torch.Tensor]:
        """obs [obs_dim] -> (actions [T, D] raw units, stats, codes [1, T', l]); the wall time
        covers the policy passes, the draft and the tokenizer decode. With the oracle stop rule,
        the dense decode that tells it the prefix gaps runs first, outside the wall time: the
        statistics are those of a stop rule that knew them for free."""
        gaps = self.dense_trace(obs, task)[2] if cfg.adaptive and cfg.stop_rule == "oracle" else None
        self._sync()
        t0 = time.perf_counter()
        o, t = self._inputs(obs, task)
        codes, stats = self.decode_codes(o, t, cfg, gen, gaps)
        self._sync()
        t1 = time.perf_counter()
        # the engine's codes come from heads that cannot emit an invalid code: no check
        actions = self.tokenizer.decode(codes, check=False)[0].cpu().numpy()
        t2 = time.perf_counter()
        stats.seconds, stats.decode_seconds = t2 - t0, t2 - t1
        return actions, stats, codes

    def check_config(self, cfg: EngineConfig, spec: str | None = None) -> None:
        """Refuse, before any decoding, settings this engine cannot honour (a mode label must say
        what ran): a draft asked for more layers than it predicts, a missing model."""
        name = spec or cfg.mode
        L = self.policy.config.num_layers
        if cfg.min_layers > L:
            raise ValueError(f"--min_layers {cfg.min_layers} exceeds the policy's {L} layers")
        if cfg.speculative:
            if self.draft is None:
                raise ValueError(f"--mode {name} needs a draft (--draft)")
            if cfg.k is not None and cfg.k > min(self.draft.config.num_layers, L):
                raise ValueError(f"--mode {name}: k = {cfg.k}, but the draft proposes at most "
                                 f"{min(self.draft.config.num_layers, L)} layers")
        if cfg.self_draft:
            if self.heads is None:
                raise ValueError(f"--mode {name} needs self-drafting heads (--heads)")
            if cfg.k is not None and cfg.k > self.heads.config.offsets:
                raise ValueError(f"--mode {name}: k = {cfg.k}, but the heads propose at most "
                                 f"{self.heads.config.offsets} layers per pass")
        if cfg.mode == "parallel" and self.parallel_policy is None:
            raise ValueError(f"--mode {name} needs --parallel_policy")
        if cfg.adaptive and cfg.stop_rule == "learned" and self.stop_model is None:
            raise ValueError(f"--mode {name} with the learned stop rule needs --stop_model")


def build_engine(policy: str, draft: str | None = None, parallel_policy: str | None = None,
                 stop_model: str | None = None, tokenizer: str | None = None, device="cpu",
                 heads: str | None = None) -> RSDEngine:
    """An engine from checkpoint paths: the main policy, and optionally a draft, a parallel-variant
    policy, a learned stop model and self-drafting heads, each checked to belong to this policy
    (sha256); the tokenizer is the one recorded in the policy unless given (then hash-checked too)."""
    main, ckpt = pm.load_policy(policy)
    tok_path = tokenizer or ckpt["provenance"]["tokenizer"]
    if not tokenizer and not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{policy} was trained with the tokenizer {tok_path}, which is not there; "
                                "give its new path with --tokenizer")
    pm.load_policy(policy, tok_path)  # refuses a different tokenizer
    from rvq_tokenizer import load_tokenizer

    tok, _ = load_tokenizer(tok_path)
    d = pm.load_draft(draft, policy)[0] if draft else None
    par = None
    if parallel_policy:
        par, _ = pm.load_policy(parallel_policy, tok_path)
        if par.config.variant != "parallel":
            raise ValueError(f"--parallel_policy {parallel_policy} is not a parallel-variant policy")
    stop = pm.load_stop(stop_model, policy)[0] if stop_model else None
    h = pm.load_heads(heads, policy)[0] if heads else None
    return RSDEngine(main, tok, d, par, stop, device=device, heads=h)


# ----------------------------------------------------------------------------- closed loop

# --action_noise: step correlation of the perturbation's AR(1), as collect_actions' DART-style
# perturbation: it pushes the arm off course for several steps, as a policy's error does
NOISE_CORRELATION = 0.9


def check_action_noise(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"--action_noise must be a finite number >= 0, got {sigma!r}")


class EnginePolicy:
    """The engine as a rollout policy (collect_actions' interface: ``reset(task, rng)``, then
    ``act(obs) -> actions [n, D]``, executed before the next call); keeps per-chunk statistics.

    With ``action_noise`` > 0, the executed actions are the decoded ones plus a perturbation of
    every dimension but the last (the gripper): an AR(1) over steps, correlation
    ``NOISE_CORRELATION``, stationary standard deviation ``action_noise`` in the tokenizer's
    normalized units (so that much of each dimension's q01..q99 half-range), clipped to [-1, 1],
    drawn from the trial's seed; the action history holds the executed actions.
    ``perturbations`` keeps each chunk's largest change of an action (max abs, normalized units)
    from the decoded actions as the controller takes them (arm clipped to [-1, 1]), the statistic
    of ``bench_decoding.py``'s action gap."""

    needs_cameras = False

    def __init__(self, engine: RSDEngine, cfg: EngineConfig, replan_steps: int, seed: int = 0,
                 action_noise: float = 0.0):
        check_action_noise(action_noise)
        engine.check_config(cfg)
        self.engine, self.cfg, self.replan_steps = engine, cfg, replan_steps
        self.action_noise = float(action_noise)
        norm = engine.tokenizer.normalizer
        self.half_range = ((norm.high - norm.low) / 2).double().numpy()[:-1]
        self.noise_scale = self.half_range * self.action_noise
        self.perturbations: list[float] = []
        self.keys, self.widths = engine.policy.config.obs_keys, engine.policy.config.obs_widths
        self.history = ActionHistory(engine.policy.config.action_history, engine.tokenizer.config.action_dim)
        self.instructions = engine.policy.config.instructions
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: list[ChunkStats] = []
        self.task_index = 0

    def reset(self, task, rng: np.random.Generator) -> None:
        if task.instruction not in self.instructions:
            raise ValueError(f"the policy was not trained on the instruction {task.instruction!r}")
        self.task_index = self.instructions.index(task.instruction)
        seed = int(rng.integers(2**31))
        self.gen.manual_seed(seed)
        self.noise_rng = np.random.default_rng([seed, 1])  # apart from the sampling generator
        self.noise = np.zeros(len(self.noise_scale))
        self.history.reset()

    def act(self, obs: dict) -> np.ndarray:
        x = np.concatenate([obs_vector(obs, self.keys, widths=self.widths), self.history.vector()])
        actions, stats, _ = self.engine.act(x, self.task_index, self.cfg, self.gen)
        self.stats.append(stats)
        actions = actions[: self.replan_steps]
        if self.action_noise > 0:
            decoded, actions = actions, actions.copy()
            innovation = math.sqrt(1.0 - NOISE_CORRELATION ** 2)
            for row in actions:
                self.noise = NOISE_CORRELATION * self.noise + innovation * self.noise_rng.standard_normal(len(self.noise))
                row[:-1] = np.clip(row[:-1] + self.noise * self.noise_scale, -1.0, 1.0)
            # against the decoded actions as the controller takes them (it clips the arm to [-1, 1])
            change = actions[:, :-1] - np.clip(decoded[:, :-1], -1.0, 1.0)
            self.perturbations.append(float(np.abs(change / self.half_range).max()))
        self.history.push(actions)  # the runner executes every action returned
        return actions
