"""Token-tree verification (mode ``tree``): the tree pass, the draft's candidates, and exactness
against dense greedy decoding on random models, near-ties included."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import rsd_engine_core as core
from rsd_engine_core import DecodingArgs, EngineConfig, RSDEngine, top_candidates
from test_rsd_engine import make_draft, make_pca_tokenizer, make_policy, make_tokenizer, random_obs


def path_logits(policy, ctx, codes, path):
    """Logits [1, T', vocab] of each block of ``path`` (tree node indices), extending a cache block
    by block with the codes the nodes carry, and that cache."""
    cache, out = policy.new_cache(), []
    for depth, node in enumerate(path):
        prev = codes[..., node:node + 1] if depth else None
        out.append(policy.extend(cache, depth, 1, prev, ctx if depth == 0 else None)[:, :, 0])
    return out, cache


# ---------------------------------------------------------------- the tree pass

@torch.no_grad()
def test_tree_pass_gives_each_block_the_logits_and_cache_of_its_path():
    tok = make_tokenizer(K=8, L=4, Tp=2)
    policy = make_policy(tok, seed=1)
    gen = torch.Generator().manual_seed(0)
    obs, task = random_obs(gen)
    ctx = policy.embed_obs(obs, task)
    layers = [0, 1, 1, 1, 2, 2, 3]
    parents = [-1, 0, 0, 0, 1, 3, 5]
    codes = torch.randint(0, 8, (1, 2, 7), generator=gen)
    cache = policy.new_cache()
    logits = policy.extend_tree(cache, layers, parents, codes, ctx)
    assert logits.shape == (1, 2, 7, 8) and cache.length == policy.n_ctx + 7 * 2
    for path in ([0, 1, 4], [0, 2], [0, 3, 5, 6]):
        expected, _ = path_logits(policy, ctx, codes, path)
        for node, ref in zip(path, expected):
            torch.testing.assert_close(logits[:, :, node], ref, atol=1e-5, rtol=1e-5)
    # keeping one path leaves the cache that extending it block by block builds; the next pass reads it
    _, ref_cache = path_logits(policy, ctx, codes, [0, 3, 5])
    policy.keep_path(cache, 7, [0, 3, 5])
    assert torch.equal(cache.blocks, ref_cache.blocks)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 8, (1, 2, 1), generator=gen)
    torch.testing.assert_close(policy.extend(cache, 3, 1, nxt), policy.extend(ref_cache, 3, 1, nxt),
                               atol=1e-5, rtol=1e-5)
    # a tree over a cache that already holds blocks 0..1: nodes below it start at layer 2
    cache2 = policy.new_cache()
    policy.extend(cache2, 0, 2, torch.cat([torch.zeros_like(codes[..., :1]), codes[..., 1:2]], -1), ctx)
    more = policy.extend_tree(cache2, [2, 3], [-1, 0], codes[..., 4:6])
    expected, _ = path_logits(policy, ctx, codes, [0, 1, 4, 5])
    torch.testing.assert_close(more[:, :, 0], expected[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(more[:, :, 1], expected[3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one layer deeper"):
        policy.extend_tree(policy.new_cache(), [0, 2], [-1, 0], codes[..., :2], ctx)
    with pytest.raises(ValueError, match="ctx"):
        policy.extend_tree(policy.new_cache(), [0], [-1], codes[..., :1])


def test_top_candidates_are_the_most_probable_codes_of_a_layer():
    """Against every code of the layer, ranked by its probability under the independent positions."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        T, V, c = 1 + trial % 3, 2 + trial % 4, 1 + trial % 5
        logits = torch.randn(T, V, generator=gen)
        if trial % 2:
            logits[:, -1] = -math.inf  # a code the layer cannot emit
        logp = torch.log_softmax(logits, -1)
        every = sorted(((float(sum(logp[t, x] for t, x in enumerate(codes))), codes)
                        for codes in itertools.product(range(V), repeat=T)), reverse=True)
        every = [(lp, codes) for lp, codes in every if lp > -math.inf]
        got = top_candidates(logits, c)
        assert len(got) == min(c, len(every))
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in every[:len(got)]], abs=1e-5)
        assert len({codes for _, codes in got}) == len(got)
        for lp, codes in got:
            assert lp == pytest.approx(float(sum(logp[t, x] for t, x in enumerate(codes))), abs=1e-5)


@pytest.mark.parametrize("chained", [False, True])
def test_the_draft_tree_holds_the_chain_then_the_most_probable_paths(chained):
    """The chain of the draft's argmax codes, then, within c x k blocks, no candidate left out is
    more probable than a block kept off the chain; every block carries one of its parent's top c."""
    tok = make_tokenizer(K=4, L=5, Tp=2)
    for seed in range(5):
        policy = make_policy(tok, seed=seed)
        draft = make_draft(policy, k=3, seed=seed, chained=chained)
        engine = RSDEngine(policy, tok, draft)
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        ctx = policy.embed_obs(obs, task)
        with torch.no_grad():
            chain = engine.draft_proposal(obs, task, ctx, 3)[1]  # [1, T', k]: rsd's proposal
        for c in (1, 2, 3):
            tree = engine.draft_tree(obs, task, ctx, 3, c)
            assert tree.size - 1 == c * 3 and tree.layers[:4] == [0, 1, 2, 3] and tree.parents[:4] == [-1, 0, 1, 2]
            assert torch.equal(tree.codes[..., 1:4], chain)
            offered, path_lp = draft_offers(engine, draft, tree, feature(engine, obs, task, ctx), c)
            for node in range(1, tree.size):
                assert tree.node_codes[node] in {codes for _, codes in offered[tree.parents[node]]}
            left_out = [path_lp[node] + lp for node in range(tree.size) if node in offered
                        for lp, codes in offered[node] if codes not in tree.children[node]]
            if c > 1:
                assert min(path_lp[4:]) >= max(left_out, default=-math.inf) - 1e-5


def feature(engine, obs, task, ctx):
    return engine._draft_inputs(obs, task, ctx)


@torch.no_grad()
def draft_offers(engine, draft, tree, inputs, c):
    """Each block's offered candidates (of its layer, from the module draft given the block's path)
    and each block's path log-probability under the draft."""
    offered, path_lp, k = {}, [0.0], draft.config.num_layers
    for node in range(tree.size):
        path, up = [], node
        while up > 0:
            path.append(tree.node_codes[up])
            up = tree.parents[up]
        layer = len(path)
        codes = torch.tensor(path[::-1] + [(0, 0)] * (k - layer)).T[None]  # [1, T', k]
        logits = draft(*inputs, codes)[0]  # [T', k, vocab]
        if node:
            parent = tree.parents[node]
            lp = dict((cand, lp) for lp, cand in offered[parent])[tree.node_codes[node]]
            path_lp.append(path_lp[parent] + lp)
        if layer < k:
            offered[node] = top_candidates(logits[:, layer], c)
    return offered, path_lp


# ---------------------------------------------------------------- exactness

CASES = [(3, 1, "embedding", False), (4, 2, "obs", False), (16, 2, "embedding", False),
         (3, 1, "embedding", True), (8, 2, "obs", True)]


@pytest.mark.parametrize("K, Tp, source, chained", CASES)
def test_tree_returns_dense_greedy_codes(K, Tp, source, chained):
    """60 random models per case, 1 to 3 candidates per layer: the codes of dense greedy decoding,
    state by state; one main pass for the tree, then one per layer after the accepted path (unless
    a choice fell within the margin of a tie: then dense decoding too, in few chunks)."""
    tok = make_tokenizer(K=K, L=4, Tp=Tp)
    accepted, fallbacks = {c: 0 for c in (1, 2, 3)}, 0
    for seed in range(60):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed, source=source, chained=chained))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        rsd, rs = engine.decode_codes(obs, task, EngineConfig("rsd"))
        for c in accepted:
            codes, st = engine.decode_codes(obs, task, EngineConfig("tree", k=3, candidates=c))
            assert torch.equal(codes, dense), f"seed {seed}, {c} candidates"
            assert st.draft_passes == 1 and st.proposed == 3 and st.layers == 4
            fallbacks += st.fallbacks
            if st.fallbacks:  # a choice within the margin of a tie: the tree pass, then dense decoding
                assert st.main_passes >= 1 + 4
                continue
            assert st.main_passes == 1 + (4 - min(st.accepted + 1, 4))
            if not rs.fallbacks:  # the tree holds rsd's chain: it accepts at least as much; with c = 1, as much
                assert st.accepted == rs.accepted if c == 1 else st.accepted >= rs.accepted
            accepted[c] += st.accepted
    assert accepted[1] < 3 * 60 and fallbacks <= 3 * 60 // 20
    if K ** Tp <= 16:  # a random draft is right often enough that whole paths were accepted
        assert accepted[1] > 0 and accepted[3] > accepted[1]


def test_tree_on_a_pca_tokenizer_and_with_every_layer_proposed():
    """k = L - 1 (the last layer's candidates would need no block) and a policy of 4 of the
    tokenizer's 6 layers, with cell scales."""
    tok = make_pca_tokenizer(K=3, L=6, Tp=1)
    for seed in range(50):
        policy = make_policy(tok, seed=seed, layers=4)
        engine = RSDEngine(policy, tok, make_draft(policy, k=4, seed=seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        codes, st = engine.decode_codes(obs, task, EngineConfig("tree", candidates=2))
        assert torch.equal(codes, dense) and st.proposed == 3


@pytest.mark.parametrize("pca", [False, True])
def test_tree_adaptive_keeps_the_layers_and_codes_of_adaptive(pca):
    """tree+adaptive: the stop test runs on each layer of the kept path, so it keeps exactly the
    layers and codes of adaptive depth alone, stopping inside the tree's path (one main pass) or
    in the dense layers after it."""
    import stop_study

    L = 6
    tok = make_pca_tokenizer(K=3, L=L, Tp=1) if pca else make_tokenizer(K=3, L=L, Tp=1)
    runs = []
    for seed in range(40):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=4, seed=seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        logits, codes, _ = engine.dense_trace(obs[0].numpy(), int(task))
        runs.append((engine, obs, task, engine.expected_refinements(logits, codes)))
    tau = float(np.median([signal[2] for *_, signal in runs]))
    in_path, after_path, depths = 0, 0, set()
    for engine, obs, task, signal in runs:
        cfg = EngineConfig("adaptive", adaptive_threshold=tau, min_layers=2)
        adaptive, _ = engine.decode_codes(obs, task, cfg)
        assert adaptive.shape[-1] == stop_study.stop_depths(signal[None], tau, 2)[0]
        for c in (1, 2):
            codes, st = engine.decode_codes(obs, task, dataclasses.replace(cfg, mode="tree+adaptive", candidates=c))
            assert torch.equal(codes, adaptive)
            if not st.fallbacks:
                in_path += st.main_passes == 1 and st.layers < L
                after_path += st.main_passes > 1
        depths.add(adaptive.shape[-1])
    assert in_path > 0 and after_path > 0 and len(depths) > 1


def near_tie_engine(seed: int, K=8, Tp=2, L=4):
    """A random model whose dense decoding meets a near-tie: the head bias of the second-best code
    of one layer is raised to the best's logit at one position (as dense decoding computes it),
    so the two are within float rounding of each other."""
    tok = make_tokenizer(K=K, L=L, Tp=Tp)
    policy = make_policy(tok, seed=seed)
    engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    obs, task = random_obs(gen)
    layer, t = seed % L, seed % Tp
    logits, _, _ = engine.dense_trace(obs[0].numpy(), int(task))
    top = logits[layer, 0, t].topk(2)
    with torch.no_grad():
        policy.head_b[layer, top.indices[1]] += top.values[0] - top.values[1]
    logits, _, _ = engine.dense_trace(obs[0].numpy(), int(task))
    top = logits[layer, 0, t].topk(2).values
    return engine, obs, task, float(top[0] - top[1])


@pytest.mark.parametrize("spec", ["tree:3/1", "tree:3/2", "rsd:3"])
def test_near_ties_do_not_flip(spec):
    """Where dense decoding's top two logits are within rounding, a multi-token pass may pick the
    other code; exact speculation sees the near-tie and decodes the chunk again densely: the codes
    are dense decoding's. Without the margin, some of these near-ties do flip."""
    flipped = 0
    for seed in range(60):
        engine, obs, task, gap = near_tie_engine(seed)
        assert gap <= 1e-5
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        cfg = DecodingArgs().engine_config(spec)
        codes, st = engine.decode_codes(obs, task, cfg)
        assert torch.equal(codes, dense), f"seed {seed}"
        assert st.fallbacks == 1 and st.main_passes >= 1 + 4  # the verify pass, then dense decoding
        unguarded, _ = engine.decode_codes(obs, task, dataclasses.replace(cfg, tie_margin=0.0))
        flipped += not torch.equal(unguarded, dense)
    assert flipped > 0


@pytest.mark.parametrize("pca, mode", [(False, "rsd+adaptive"), (True, "rsd+adaptive"), (True, "tree+adaptive")])
def test_stop_signals_at_the_threshold_do_not_flip(pca, mode):
    """Exact speculation with the expected_norm rule keeps exactly the layers adaptive depth alone
    keeps, even where a layer's stop signal, as dense decoding computes it, equals the threshold:
    read off a multi-token pass, the signal may land on the other side, so the guard sends the
    chunk back to dense decoding. Without the margin, some of these stops do flip."""
    L, flipped, guarded = 5, 0, 0
    tok = make_pca_tokenizer(K=8, L=L, Tp=2) if pca else make_tokenizer(K=8, L=L, Tp=2)
    for seed in range(40):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        logits, codes, _ = engine.dense_trace(obs[0].numpy(), int(task))
        signal = engine.expected_refinements(logits, codes)
        cfg = EngineConfig("adaptive", adaptive_threshold=float(signal[seed % (L - 1)]))
        adaptive, _ = engine.decode_codes(obs, task, cfg)
        assert adaptive.shape[-1] <= seed % (L - 1) + 1  # it stops at that layer or before
        both, st = engine.decode_codes(obs, task, dataclasses.replace(cfg, mode=mode))
        assert torch.equal(both, adaptive), f"seed {seed}"
        guarded += st.fallbacks
        unguarded, _ = engine.decode_codes(obs, task, dataclasses.replace(cfg, mode=mode, tie_margin=0.0))
        flipped += not torch.equal(unguarded, adaptive)
    assert flipped > 0 and guarded >= flipped


def test_the_margin_leaves_ordinary_choices_to_the_tree():
    """Rounding differences between the tree pass and dense passes, relative to the logits' size,
    are under a tenth of the margin, and the choices of random models are rarely within it."""
    tok = make_tokenizer(K=16, L=4, Tp=2)
    worst, fallbacks = 0.0, 0
    for seed in range(30):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        logits, dense, _ = engine.dense_trace(obs[0].numpy(), int(task))
        with torch.no_grad():
            ctx = policy.embed_obs(obs, task)
            carried = torch.cat([torch.zeros_like(dense[..., :1]), dense[..., :3]], -1)  # block l: layer l - 1
            tree = policy.extend_tree(policy.new_cache(), [0, 1, 2, 3], [-1, 0, 1, 2], carried, ctx)
        scale = max(1.0, float(logits.abs().max()))  # the margin is relative to the logits' size
        worst = max(worst, float((tree[0].transpose(0, 1) - logits[:, 0]).abs().max()) / scale)
        fallbacks += engine.decode_codes(obs, task, EngineConfig("tree"))[1].fallbacks
    assert 0 < worst < EngineConfig().tie_margin / 10
    assert fallbacks <= 1


# ---------------------------------------------------------------- the mode grammar

def test_tree_mode_specs():
    assert core.split_spec("tree:3/2") == ("tree", "", 3, 2)
    assert core.split_spec("tree/4") == ("tree", "", None, 4)
    assert core.split_spec("rsd@relaxed:7") == ("rsd", "relaxed", 7, None)
    assert core.base_mode("tree:3/2") == "tree"
    args = DecodingArgs(acceptance="relaxed", candidates=3, tie_margin=0.01)
    cfg = args.engine_config("tree:2")
    assert (cfg.mode, cfg.acceptance, cfg.k, cfg.candidates, cfg.tie_margin) == ("tree", "exact", 2, 3, 0.01)
    assert args.engine_config("tree/5").candidates == 5 and cfg.tree and cfg.speculative
    both = args.engine_config("tree+adaptive:3/2")
    assert (both.mode, both.k, both.candidates, both.tree, both.adaptive, both.guarded) == (
        "tree+adaptive", 3, 2, True, True, True)
    assert args.engine_config("rsd").acceptance == "relaxed"
    for bad in ("rsd/2", "tree/0", "tree:3/x", "dense/2"):
        with pytest.raises(ValueError, match=r"MODE\[@ACCEPTANCE\]\[:K\]\[/C\]"):
            core.parse_modes(bad)
    with pytest.raises(ValueError, match="acceptance must be 'exact'"):
        args.engine_config("tree@relaxed")
    with pytest.raises(ValueError, match="candidates"):
        EngineConfig("tree", candidates=0)
    with pytest.raises(ValueError, match="--candidates"):
        DecodingArgs(candidates=0).check_decoding()
    tok = make_tokenizer()
    engine = RSDEngine(make_policy(tok), tok)
    with pytest.raises(ValueError, match="--mode tree:2 needs a draft"):
        engine.check_config(args.engine_config("tree:2"), "tree:2")
