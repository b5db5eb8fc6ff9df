"""Token policy masks, checkpoints and the RSD engine's guarantees, on random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import policy_models as pm
from rsd_engine_core import EngineConfig, RSDEngine, time_split_ms
from rvq_tokenizer import RVQConfig, RVQTokenizer

OBS_DIM = 9


def make_tokenizer(K=4, L=4, Tp=2, seed=0):
    torch.manual_seed(seed)
    tok = RVQTokenizer(RVQConfig(action_dim=3, chunk_size=4, latent_steps=Tp, num_layers=L,
                                 codebook_size=K, hidden_dim=16, code_dim=4))
    for layer in tok.quantizer.layers:  # spread the codebooks so layers differ in size
        layer.codebook.normal_(0, 1.0 / (1 + list(tok.quantizer.layers).index(layer)))
    return tok.eval()


def make_policy(tok, variant="ar", seed=0, d=32, layers=None):
    """A random policy of the tokenizer's first ``layers`` layers (default: all)."""
    torch.manual_seed(seed)
    c = tok.config
    layers = layers or c.num_layers
    cfg = pm.PolicyConfig(obs_dim=OBS_DIM, instructions=("a", "b"), latent_steps=c.latent_steps,
                          num_layers=layers, codebook_sizes=tok.layer_codebook_sizes()[:layers],
                          variant=variant, d_model=d, n_heads=2, n_blocks=2, obs_tokens=2,
                          dropout=0.0)
    model = pm.TokenPolicy(cfg)
    with torch.no_grad():  # sharper random distributions than the init gives
        model.head_w.normal_(0, 0.5)
    return model.eval()


def make_draft(policy, k=3, seed=0, source="embedding", chained=False):
    torch.manual_seed(seed)
    c = policy.config
    in_dim = policy.n_ctx * c.d_model if source == "embedding" else c.obs_dim + 32
    cfg = pm.DraftConfig(in_dim=in_dim, latent_steps=c.latent_steps, num_layers=k,
                         codebook_sizes=c.codebook_sizes[:k], source=source, hidden=32, chained=chained)
    draft = pm.DraftModel(cfg, num_tasks=len(c.instructions)).eval()
    if chained:  # the code embeddings start at zero: make each layer's step depend on the codes below
        with torch.no_grad():
            draft.code_emb.normal_(0, 1.0)
    return draft


def random_obs(gen):
    return torch.randn(1, OBS_DIM, generator=gen), torch.randint(0, 2, (1,), generator=gen)


# ---------------------------------------------------------------- the policy's mask

def test_teacher_forced_pass_equals_layer_by_layer_cached_passes():
    tok = make_tokenizer(K=8, L=4)
    policy = make_policy(tok)
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(3, OBS_DIM, generator=gen)
    task = torch.tensor([0, 1, 0])
    codes = torch.randint(0, 8, (3, 2, 4), generator=gen)
    full = policy(obs, task, codes)  # [B, T', L, V]
    cache = policy.new_cache()
    ctx = policy.embed_obs(obs, task)
    for l in range(4):
        prev = codes[..., l - 1: l] if l else None
        step = policy.extend(cache, l, 1, prev, ctx if l == 0 else None)[:, :, 0]
        torch.testing.assert_close(step, full[:, :, l], atol=1e-5, rtol=1e-5)


def test_layer_l_sees_lower_layers_only():
    tok = make_tokenizer(K=8, L=4)
    policy = make_policy(tok)
    gen = torch.Generator().manual_seed(2)
    obs, task = torch.randn(2, OBS_DIM, generator=gen), torch.tensor([0, 1])
    codes = torch.randint(0, 8, (2, 2, 4), generator=gen)
    changed = codes.clone()
    changed[..., 1] = (changed[..., 1] + 1) % 8
    a, b = policy(obs, task, codes), policy(obs, task, changed)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])      # layers 0, 1 do not read layer 1
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-4      # layer 2 does
    par = make_policy(tok, variant="parallel")
    torch.testing.assert_close(par(obs, task, codes), par(obs, task, changed))


# ---------------------------------------------------------------- checkpoints

def test_policy_and_draft_save_reload_exact_and_mismatch_refused(tmp_path):
    tok = make_tokenizer()
    tok_a, tok_b = tmp_path / "tok_a.pt", tmp_path / "tok_b.pt"
    tok_a.write_bytes(b"tokenizer a")
    tok_b.write_bytes(b"tokenizer b")
    policy = make_policy(tok)
    pol_path = str(tmp_path / "policy.pt")
    pm.save_policy(policy, pol_path, pm.file_sha256(str(tok_a)), {"seed": 0})
    loaded, _ = pm.load_policy(pol_path, str(tok_a))
    for (k, v), (k2, v2) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="different tokenizer"):
        pm.load_policy(pol_path, str(tok_b))
    draft = make_draft(policy)
    draft_path = str(tmp_path / "draft.pt")
    pm.save_draft(draft, draft_path, pm.file_sha256(pol_path), 2, {})
    d2, _ = pm.load_draft(draft_path, pol_path)
    x = torch.randn(4, draft.config.in_dim)
    assert torch.equal(draft(x), d2(x))
    with pytest.raises(ValueError, match="different main policy"):
        pm.load_draft(draft_path, str(tok_a))
    with pytest.raises(ValueError, match="not a rsd_token_policy checkpoint"):
        pm.load_policy(draft_path)
    (tmp_path / "trunc.pt").write_bytes(open(pol_path, "rb").read()[:100])
    with pytest.raises(ValueError, match="trunc.pt"):
        pm.load_policy(str(tmp_path / "trunc.pt"))


# ---------------------------------------------------------------- exact speculation

@pytest.mark.parametrize("K, Tp, source, chained", [(3, 1, "embedding", False), (4, 1, "obs", False),
                                                    (16, 2, "embedding", False), (3, 1, "embedding", True),
                                                    (16, 2, "obs", True)])
def test_rsd_exact_equals_dense_greedy(K, Tp, source, chained):
    """Random models: the draft is right sometimes (small vocab) and wrong often."""
    tok = make_tokenizer(K=K, L=4, Tp=Tp)
    accepted_total, proposed_total, fallbacks = 0, 0, 0
    for seed in range(40):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed, source=source, chained=chained))
        gen = torch.Generator().manual_seed(seed)
        obs, task = random_obs(gen)
        dense, ds = engine.decode_codes(obs, task, EngineConfig("dense"))
        spec, ss = engine.decode_codes(obs, task, EngineConfig("rsd", "exact"))
        assert torch.equal(dense, spec), f"seed {seed}"
        assert ds.main_passes == 4 and ss.draft_passes == 1 and ss.proposed == 3 and ss.layers == 4
        fallbacks += ss.fallbacks
        if ss.fallbacks:  # a choice within the tie margin: the verify pass, then dense decoding
            assert ss.main_passes >= 1 + 4
            continue
        # statistics add up: one verify pass, then one pass per layer past the verified ones
        verified = min(ss.accepted + 1, 4)
        assert ss.main_passes == 1 + (4 - verified)
        assert 0 <= ss.accepted <= 3
        accepted_total += ss.accepted
        proposed_total += ss.proposed
    assert accepted_total < proposed_total and fallbacks <= 4
    if K <= 4:  # a random draft is right often enough that acceptance was exercised too
        assert accepted_total > 0


def test_rsd_with_a_perfect_draft_accepts_everything():
    tok = make_tokenizer(K=8, L=5)
    policy = make_policy(tok, seed=3)
    draft = make_draft(policy, k=3)
    engine = RSDEngine(policy, tok, draft)
    gen = torch.Generator().manual_seed(0)
    obs, task = random_obs(gen)
    dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
    with torch.no_grad():  # make the draft output the dense codes: position t, layer l -> unit vector
        draft.proj.weight.zero_()
        draft.proj.bias.copy_(torch.eye(draft.config.rank)[:6].flatten())  # T'*k = 6 <= rank
        draft.out_b.zero_()
        draft.out_w.zero_()
        for t in range(2):
            for l in range(3):
                draft.out_w[t * 3 + l, dense[0, t, l]] = 10.0
    engine = RSDEngine(policy, tok, draft)  # the engine folds the draft's weights when built
    codes, st = engine.decode_codes(obs, task, EngineConfig("rsd", "exact"))
    assert torch.equal(codes, dense)
    assert (st.accepted, st.main_passes) == (3, 1 + (5 - 4))


# ---------------------------------------------------------------- speculative sampling

def exact_distribution(policy, obs, task, K):
    """p(c0, c1) of sampling the main policy layer by layer (T' = 1, L = 2)."""
    with torch.no_grad():
        p0 = torch.softmax(policy(obs, task, None, num_layers=1)[0, 0, 0], -1)
        joint = torch.zeros(K, K)
        for c0 in range(K):
            codes = torch.tensor([[[c0, 0]]])
            p1 = torch.softmax(policy(obs, task, codes)[0, 0, 1], -1)
            joint[c0] = p0[c0] * p1
    return joint


@pytest.mark.parametrize("chained", [False, True])
def test_speculative_sampling_reproduces_the_main_distribution(chained):
    """A chained draft samples layer 1 given the code it sampled for layer 0; the main policy's
    distribution comes out either way."""
    K, n = 3, 3000
    tok = make_tokenizer(K=K, L=2, Tp=1)
    policy = make_policy(tok, seed=5)
    draft = make_draft(policy, k=2, seed=7, chained=chained)
    engine = RSDEngine(policy, tok, draft)
    obs, task = random_obs(torch.Generator().manual_seed(3))
    target = exact_distribution(policy, obs, task, K)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(K, K)
    accepted = 0
    for _ in range(n):
        codes, st = engine.decode_codes(obs, task, EngineConfig("rsd", "sample"), gen)
        counts[codes[0, 0, 0], codes[0, 0, 1]] += 1
        accepted += st.accepted
    assert 0 < accepted < 2 * n  # the draft differs from the main model: both paths ran
    # chi-square goodness of fit, 8 degrees of freedom: p = 0.001 at 26.1
    expected = target * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 26.1, (chi2, counts / n, target)
    # and the draft's own distribution is clearly rejected by the same test
    q_joint = torch.zeros(K, K)
    with torch.no_grad():
        feats = policy.embed_obs(obs, task).flatten(1)
        for c0 in range(K):
            q = torch.softmax(draft(feats, None, torch.tensor([[[c0, 0]]])), -1)[0, 0]  # [k, V]
            q_joint[c0] = q[0, c0] * q[1]
    assert float(((counts - q_joint * n) ** 2 / (q_joint * n)).sum()) > 26.1


# ---------------------------------------------------------------- relaxed acceptance

def test_relaxed_never_accepts_beyond_tolerance():
    tok = make_tokenizer(K=16, L=4)
    seen_relaxed = rejected = 0
    for seed in range(30):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        tol = 0.8  # about the median gap between two codes of these random models
        codes, st = engine.decode_codes(obs, task, EngineConfig("rsd", "relaxed", tolerance=tol))
        rejected += st.accepted < st.proposed
        # re-derive each accepted layer's gap against the main policy's argmax for it
        with torch.no_grad():
            logits = policy(obs, task, codes)
        for l in range(st.accepted):
            main = logits[:, :, l].argmax(-1)
            if not torch.equal(main, codes[..., l]):
                seen_relaxed += 1
                prefix = [codes[..., i] for i in range(l)]
                assert engine.action_gap(prefix, codes[..., l], main) <= tol
    assert seen_relaxed > 0
    assert rejected > 0  # the tolerance bound was exercised from both sides


@pytest.mark.parametrize("kind", ["mlp", "pca"])
def test_relaxed_gaps_batch_equals_decoding_each_prefix(kind):
    """The batched gaps are the gaps of decoding each pair of prefixes on its own, and the
    one-layer action gap agrees with them (MLP and principal-axes tokenizers)."""
    if kind == "mlp":
        tok = make_tokenizer(K=16, L=4)
        engine = RSDEngine(make_policy(tok), tok)
    else:
        tok = make_pca_tokenizer(K=16, L=6, Tp=2)
        engine = RSDEngine(make_policy(tok, layers=4), tok)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        proposal = torch.randint(0, 16, (1, 2, 4), generator=gen)
        main = torch.where(torch.rand(1, 2, 4, generator=gen) < 0.5, proposal,
                           torch.randint(0, 16, (1, 2, 4), generator=gen))
        gaps = engine.relaxed_gaps(proposal, main)
        for l in range(4):
            mixed = torch.cat([proposal[..., :l], main[..., l:l + 1]], -1)
            a = tok.normalize(tok.decode(proposal[..., :l + 1]))
            b = tok.normalize(tok.decode(mixed))
            assert float(gaps[l]) == pytest.approx(float((a - b).abs().max()), abs=1e-5)
            if torch.equal(proposal[..., l], main[..., l]):
                assert float(gaps[l]) == 0.0
        prefix = [proposal[..., i] for i in range(3)]
        assert engine.action_gap(prefix, proposal[..., 3], main[..., 3]) == pytest.approx(float(gaps[3]), abs=1e-6)


# ---------------------------------------------------------------- adaptive depth

def test_adaptive_stops_early_and_decodes_a_prefix():
    tok = make_tokenizer(K=8, L=4)
    policy = make_policy(tok, seed=1)
    engine = RSDEngine(policy, tok, make_draft(policy))
    obs, task = random_obs(torch.Generator().manual_seed(0))
    dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
    always = EngineConfig("adaptive", adaptive_threshold=1e9, min_layers=2)
    codes, st = engine.decode_codes(obs, task, always)
    assert codes.shape[-1] == 2 and st.main_passes == 2
    assert torch.equal(codes, dense[..., :2])
    never = EngineConfig("adaptive", adaptive_threshold=0.0)
    assert torch.equal(engine.decode_codes(obs, task, never)[0], dense)
    spec, _ = engine.decode_codes(obs, task, EngineConfig("rsd+adaptive", adaptive_threshold=1e9,
                                                          min_layers=2))
    assert torch.equal(spec, dense[..., :2])
    actions, st, _ = engine.act(obs[0].numpy(), int(task), always)
    assert actions.shape == (4, 3) and st.seconds > 0


def test_oracle_stop_keeps_the_first_prefix_within_the_threshold():
    """The oracle rule stops at the first layer (from min_layers on) whose actions are within the
    threshold of all layers' (gaps decoded here prefix by prefix), with or without speculation;
    its dense decode is not in the chunk's statistics."""
    tok = make_tokenizer(K=8, L=4)
    policy = make_policy(tok, seed=1)
    engine = RSDEngine(policy, tok, make_draft(policy))
    gen = torch.Generator().manual_seed(0)
    depths = []
    for _ in range(20):
        obs, task = random_obs(gen)
        o, t = obs[0].numpy(), int(task)
        dense_actions, _, dense = engine.act(o, t, EngineConfig("dense"))
        whole = tok.normalize(torch.as_tensor(dense_actions)[None])[0]
        gaps = [float((tok.normalize(tok.decode(dense[..., :n], check=False))[0] - whole).abs().max())
                for n in range(1, 5)]
        for threshold in (0.0, gaps[2], 1e9):
            expected = next(n for n in range(2, 5) if gaps[n - 1] <= threshold)
            for mode in ("adaptive", "rsd+adaptive"):
                cfg = EngineConfig(mode, stop_rule="oracle", adaptive_threshold=threshold, min_layers=2)
                _, st, codes = engine.act(o, t, cfg)
                assert torch.equal(codes, dense[..., :expected]) and st.layers == expected
                assert st.main_passes <= expected
            depths.append(expected)
    assert {2, 3, 4} <= set(depths)
    obs, task = random_obs(gen)
    with pytest.raises(ValueError, match="prefix gaps"):
        engine.decode_codes(obs, task, EngineConfig("adaptive", stop_rule="oracle"))
    with pytest.raises(ValueError, match="exact acceptance"):
        EngineConfig("rsd+adaptive", acceptance="sample", stop_rule="oracle")
    EngineConfig("rsd", acceptance="sample", stop_rule="oracle")  # not adaptive: the rule is unused


def test_chunk_time_split_adds_up_to_the_latency():
    tok = make_tokenizer(K=8, L=4)
    policy = make_policy(tok, seed=1)
    engine = RSDEngine(policy, tok, make_draft(policy))
    obs, task = random_obs(torch.Generator().manual_seed(0))
    chunks = []
    for mode in ("dense", "rsd"):
        _, st, _ = engine.act(obs[0].numpy(), int(task), EngineConfig(mode))
        assert st.main_seconds > 0 and st.decode_seconds > 0
        assert (st.draft_seconds > 0) == (mode == "rsd")
        assert st.main_seconds + st.draft_seconds + st.decode_seconds < st.seconds
        chunks.append(st)
    split = time_split_ms(chunks)
    assert split["total"] == pytest.approx(1e3 * (chunks[0].seconds + chunks[1].seconds) / 2)
    assert split["other"] > 0
    assert sum(v for k, v in split.items() if k != "total") == pytest.approx(split["total"])


def test_engine_refuses_bad_setups():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="autoregressive"):
        RSDEngine(make_policy(tok, variant="parallel"), tok)
    engine = RSDEngine(make_policy(tok), tok)
    obs, task = random_obs(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a draft"):
        engine.decode_codes(obs, task, EngineConfig("rsd"))
    with pytest.raises(ValueError, match="parallel-variant"):
        engine.decode_codes(obs, task, EngineConfig("parallel"))
    with pytest.raises(ValueError, match="mode must be one of"):
        EngineConfig("turbo")


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("source", ["embedding", "obs"])
@pytest.mark.parametrize("depth", [1, 3])
def test_fused_draft_computes_the_module_function(source, depth, chained):
    """The folded inference form (one head matrix, per-task bias, no module calls) gives the
    module's logits, -inf for codes a smaller codebook cannot emit, and the same argmax; its
    proposal is the module's, layer by layer from its own codes when chained."""
    torch.manual_seed(depth)
    sizes = (8, 5, 8)
    cfg = pm.DraftConfig(in_dim=20 if source == "embedding" else 12 + 32, latent_steps=2,
                         num_layers=3, codebook_sizes=sizes, source=source, hidden=24,
                         depth=depth, rank=6, chained=chained, step_hidden=10 if chained else None)
    draft = pm.DraftModel(cfg, num_tasks=4).eval()
    with torch.no_grad():  # non-trivial biases and code embeddings everywhere
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
        (draft.code_emb if chained else draft.out_b).normal_()
    fused = draft.fused()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        B = 1 if seed % 2 == 0 else 6
        x = torch.randn(B, 20 if source == "embedding" else 12, generator=gen)
        task = torch.randint(0, 4, (B,), generator=gen)
        codes = torch.stack([torch.randint(0, k, (B, 2), generator=gen) for k in sizes], -1)
        with torch.no_grad():
            ref = draft(x, task, codes)
        out = fused(x, task, codes)
        assert out.shape == ref.shape
        assert torch.equal(torch.isinf(out), torch.isinf(ref))
        assert torch.isinf(out[:, :, 1, 5:]).all() and not torch.isinf(out[:, :, 1, :5]).any()
        finite = torch.isfinite(ref)
        assert torch.allclose(out[finite], ref[finite], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        with torch.no_grad():
            ref_logits, ref_codes = draft.propose(x, task)
        logits, proposal = fused.propose(x, task)
        assert torch.equal(proposal, ref_codes)
        assert torch.allclose(logits[finite], ref_logits[finite], atol=1e-5)
        # the proposal's logits are the draft's given the proposal's own codes below each layer
        assert torch.allclose(logits, fused(x, task, proposal), atol=1e-6)
        assert torch.equal(proposal, logits.argmax(-1))
        short_logits, short = fused.propose(x, task, k=2)
        assert torch.equal(short, proposal[..., :2])
        if chained:  # the codes below a layer move its logits; a one-pass draft ignores them
            assert not torch.allclose(out[:, :, 1:], fused(x, task, (codes + 1) % 5)[:, :, 1:])
            assert torch.equal(out[:, :, 0], fused(x, task, (codes + 1) % 5)[:, :, 0])
        else:
            assert torch.equal(out, fused(x, task))
    # a snapshot: changing the module afterwards does not change the fused form
    with torch.no_grad():
        (draft.heads[1].bias if chained else draft.out_b).add_(1.0)
    assert not torch.allclose(fused(x, task, codes)[finite], draft(x, task, codes)[finite])


def test_chained_draft_needs_the_codes_below_and_a_boolean_flag():
    cfg = pm.DraftConfig(in_dim=6, latent_steps=2, num_layers=3, codebook_sizes=(4, 4, 4), chained=True)
    draft = pm.DraftModel(cfg)
    with pytest.raises(ValueError, match=r"codes of layers 0..1"):
        draft(torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"codes of layers 0..1"):
        draft.fused()(torch.zeros(1, 6), None, torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be in 1..3"):
        draft.propose(torch.zeros(1, 6), k=4)
    with pytest.raises(ValueError, match="chained must be True or False"):
        pm.DraftConfig(in_dim=6, latent_steps=2, num_layers=3, codebook_sizes=(4, 4, 4), chained="yes")
    with pytest.raises(ValueError, match="step_hidden must be a positive integer"):
        pm.DraftConfig(in_dim=6, latent_steps=2, num_layers=3, codebook_sizes=(4, 4, 4), chained=True,
                       step_hidden=0)


# ---------------------------------------------------------------- a pca tokenizer (cell scales)

def make_pca_tokenizer(K=8, L=6, Tp=2, seed=0):
    """Encoder 'pca' with cell scales (action_dim 3, chunk 4: 12 principal coordinates over T'
    positions, zero-padded): random orthonormal axes, codebooks that shrink with depth, random
    cell scales."""
    torch.manual_seed(seed)
    tok = RVQTokenizer(RVQConfig(action_dim=3, chunk_size=4, latent_steps=Tp, num_layers=L, codebook_size=K,
                                 encoder="pca"))
    axes, q = tok.encoder, tok.quantizer
    with torch.no_grad():
        axes.basis[:, :12] = torch.linalg.qr(torch.randn(12, 12))[0]  # the padding columns stay zero
        axes.mean.normal_(0, 0.1)
        for l, layer in enumerate(q.layers):
            layer.codebook.normal_(0, 1.0 / (1 + l))
        q.scales.uniform_(0.5, 2.0)
    assert tok.config.cell_scale
    return tok.eval()


def test_the_engine_takes_a_pca_tokenizer_whose_first_layers_the_policy_predicts():
    tok = make_pca_tokenizer(K=8, L=6, Tp=2)
    policy = make_policy(tok, layers=4)
    engine = RSDEngine(policy, tok, make_draft(policy, k=3))
    q = tok.quantizer
    assert engine.code_vectors.shape == (4, 8, 6)
    assert torch.equal(engine.code_vectors[3], q.layers[3].codebook)
    assert torch.equal(engine.code_scales, q.scales[:4])
    obs, task = random_obs(torch.Generator().manual_seed(0))
    actions, st, codes = engine.act(obs[0].numpy(), int(task), EngineConfig("dense"))
    assert codes.shape == (1, 2, 4) and st.main_passes == 4
    assert torch.equal(torch.as_tensor(actions)[None], tok.decode(codes))  # a prefix of the 6 layers decodes
    assert actions.shape == (4, 3)
    for bad, named in ((make_policy(make_pca_tokenizer(L=7), layers=7), "7 layers"),
                       (make_policy(make_pca_tokenizer(Tp=3), layers=4), "T'=3"),
                       (make_policy(make_pca_tokenizer(K=5), layers=4), r"\(5, 5, 5, 5\) codes")):
        with pytest.raises(ValueError, match="does not predict the first layers of this tokenizer"):
            RSDEngine(bad, tok)
        with pytest.raises(ValueError, match=named):
            RSDEngine(bad, tok)
    none = RVQTokenizer(RVQConfig(action_dim=3, chunk_size=4, latent_steps=2, num_layers=6, codebook_size=8,
                                  encoder="none"))
    with pytest.raises(ValueError, match="encoder 'none' codes its whole-chunk layers in T' sequential stages"):
        RSDEngine(make_policy(none, layers=4), none)


def test_running_scales_are_the_products_of_each_positions_earlier_code_scales():
    """scales_before (all layers at once) and RunningScale (layer by layer) give S_t before
    layer l: the product of scales[j, code_{t, j}], j < l; expected_refinement is then the
    expected norm of what the layer adds, max over positions."""
    from rsd_engine_core import RunningScale

    tok = make_pca_tokenizer(K=8, L=6, Tp=2)
    engine = RSDEngine(make_policy(tok, layers=5), tok)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (1, 2, 5), generator=gen)
    scales = tok.quantizer.scales
    by_hand = torch.ones(1, 2, 5)
    for l in range(1, 5):
        by_hand[..., l] = by_hand[..., l - 1] * scales[l - 1, codes[..., l - 1]]
    before = engine.scales_before(codes)
    torch.testing.assert_close(before, by_hand)
    running = RunningScale(engine)
    for l in range(5):
        assert torch.equal(running.value, before[..., l])
        running.push(l, codes[..., l])
    logits = torch.randn(1, 2, 8, generator=gen)
    p = torch.softmax(logits, -1)
    for l in range(5):
        size = (before[0, :, l, None] * tok.quantizer.layers[l].codebook.norm(dim=-1)).mul(p[0]).sum(-1)  # [T']
        assert engine.expected_refinement(logits, l, before[..., l]) == pytest.approx(float(size.max()), rel=1e-6)
    # an MLP tokenizer's codes carry no scales: the signal is the plain expected code norm
    mlp = make_tokenizer(K=8, L=4)
    plain = RSDEngine(make_policy(mlp), mlp)
    assert plain.code_scales is None and plain.scales_before(codes[..., :4]) is None
    assert RunningScale(plain).value is None


@pytest.mark.parametrize("K, Tp, chained", [(3, 2, False), (8, 2, True), (4, 5, False)])
def test_on_a_pca_tokenizer_rsd_is_dense_and_adaptive_keeps_its_layers_with_speculation(K, Tp, chained):
    """Exact rsd returns dense greedy decoding's codes, state by state; adaptive depth (the
    expected_norm rule, carrying the positions' running scales) stops where the study's signals
    say, and rsd+adaptive keeps the same layers and codes. T'=5: 12 coordinates padded to 15."""
    import stop_study

    tok = make_pca_tokenizer(K=K, L=6, Tp=Tp)
    states, accepted = [], 0
    for seed in range(16):
        policy = make_policy(tok, seed=seed, layers=4)
        engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=seed, chained=chained))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        spec, st = engine.decode_codes(obs, task, EngineConfig("rsd"))
        assert torch.equal(dense, spec), f"seed {seed}"
        accepted += st.accepted
        logits, codes, _ = engine.dense_trace(obs[0].numpy(), int(task))
        assert torch.equal(codes, dense)
        states.append((engine, obs, task, engine.expected_refinements(logits, codes)))
    if K ** Tp <= 16:  # a random draft guesses a whole layer often enough that acceptance ran too
        assert accepted > 0
    tau = float(np.median([signal[1] for *_, signal in states]))
    depths = []
    for engine, obs, task, signal in states:
        cfg = dict(adaptive_threshold=tau, min_layers=2)
        adaptive, _ = engine.decode_codes(obs, task, EngineConfig("adaptive", **cfg))
        both, _ = engine.decode_codes(obs, task, EngineConfig("rsd+adaptive", **cfg))
        assert torch.equal(adaptive, both)
        assert adaptive.shape[-1] == stop_study.stop_depths(signal[None], tau, 2)[0]
        depths.append(adaptive.shape[-1])
    assert 2 in depths and max(depths) > 2


def test_on_a_pca_tokenizer_the_learned_stop_features_are_the_decoded_prefixs_latent():
    """LearnedStop's latent after layer l is the latent the tokenizer decodes the first l + 1
    layers from (the code vectors times the positions' running scales); the learned rule keeps
    the same layers with and without speculation."""
    from rsd_engine_core import LearnedStop

    tok = make_pca_tokenizer(K=8, L=6, Tp=2)
    policy = make_policy(tok, seed=2, layers=4)
    n_latent = 2 * tok.config.quantizer_dim
    torch.manual_seed(0)
    stop = pm.StopModel(pm.StopConfig(in_dim=n_latent + 4, num_layers=4, hidden=16)).eval()
    engine = RSDEngine(policy, tok, make_draft(policy, k=3, seed=2), stop_model=stop)
    gen = torch.Generator().manual_seed(3)
    predicted, states = [], []
    for _ in range(16):
        obs, task = random_obs(gen)
        _, codes, _ = engine.dense_trace(obs[0].numpy(), int(task))
        features = LearnedStop(engine)
        for l in range(4):
            x = features.features(l, codes[..., l])
            latent = tok.quantizer.decode_codes(codes[..., :l + 1])  # [1, T', c]
            torch.testing.assert_close(x[:, :n_latent], latent.reshape(1, -1), atol=1e-6, rtol=1e-6)
            assert torch.equal(x[0, n_latent:], torch.eye(4)[l])
        trace = LearnedStop(engine)
        predicted.append([trace.predicted_gap(l, codes[..., l]) for l in range(4)])
        states.append((obs, task))
    tau = float(np.median([p[1] for p in predicted]))
    depths = []
    for obs, task in states:
        cfg = dict(adaptive_threshold=tau, min_layers=2, stop_rule="learned")
        adaptive, _ = engine.decode_codes(obs, task, EngineConfig("adaptive", **cfg))
        both, _ = engine.decode_codes(obs, task, EngineConfig("rsd+adaptive", **cfg))
        assert torch.equal(adaptive, both)
        depths.append(adaptive.shape[-1])
    assert 2 in depths and max(depths) > 2
