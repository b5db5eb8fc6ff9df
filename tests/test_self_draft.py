"""Self-drafting heads (modes ``heads``, ``heads+adaptive``, and ``rsd+heads`` whose first pass
verifies a draft's proposal): exactness against dense greedy
decoding on random models, the pass count with perfect heads, near-ties, checkpoints and
training."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import policy_models as pm
import bench_decoding
import rsd_engine_core as core
import train_draft
from bench_decoding import OracleDraft, OracleHeads
from policy_fixtures import draft_args, rollout_file, trained, workdir  # noqa: F401
from rsd_engine_core import DecodingArgs, EngineConfig, RSDEngine
from test_rsd_engine import make_draft, make_pca_tokenizer, make_policy, make_tokenizer, random_obs
from rvq_tokenizer import load_tokenizer
from test_tree_decoding import near_tie_engine


def make_heads(policy, offsets=2, seed=0):
    """Random heads whose proposals vary with the hidden state and the code below (the init's
    zero MLP output and small tables would propose nearly the same codes everywhere)."""
    torch.manual_seed(seed)
    c = policy.config
    heads = pm.DraftHeads(pm.HeadsConfig(d_model=c.d_model, latent_steps=c.latent_steps, num_layers=c.num_layers,
                                         codebook_sizes=c.codebook_sizes, offsets=offsets, hidden=16))
    with torch.no_grad():
        heads.head_w.normal_(0, 0.5)
        heads.down_w.normal_(0, 0.3)
        heads.code_emb.weight.normal_(0, 1.0)
    return heads.eval()


def oracle_engine(engine: RSDEngine, obs, task, offsets=None) -> OracleHeads:
    """Perfect heads on ``engine``, set to the state's dense greedy codes."""
    oracle = OracleHeads(engine.policy, offsets)
    oracle.set_codes(engine.decode_codes(obs, task, EngineConfig("dense"))[0])
    engine.heads = oracle
    return oracle


def passes_with_perfect_heads(L: int, J: int, k: int = 0) -> int:
    """The first pass carries the ctx, block 0 and the draft's k proposed layers (rsd+heads; none
    in heads) and yields layers 0..k; every later pass then yields its J accepted proposals and
    the main policy's prediction after them (fewer near the last layer)."""
    return 1 + math.ceil((L - 1 - k) / (J + 1))


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("K, Tp, L, J, spec", [(3, 1, 4, 2, "heads"), (4, 2, 6, 3, "heads"), (16, 2, 5, 2, "heads"),
                                               (4, 1, 8, 6, "heads:2"), (8, 3, 6, 4, "heads:4"),
                                               (3, 1, 6, 2, "rsd+heads"), (4, 2, 8, 3, "rsd+heads:2"),
                                               (16, 2, 4, 2, "rsd+heads")])
def test_heads_equal_dense_greedy_state_by_state(K, Tp, L, J, spec):
    """60 random models and heads (and, rsd+heads, drafts of 3 layers) per case: the heads and
    drafts are right sometimes (small codebooks) and wrong often; the codes are dense greedy
    decoding's whatever they propose."""
    tok = make_tokenizer(K=K, L=L, Tp=Tp)
    cfg = DecodingArgs().engine_config(spec)
    per_pass = cfg.k or J
    accepted = proposed = fallbacks = 0
    for seed in range(60):
        policy = make_policy(tok, seed=seed)
        draft = make_draft(policy, min(3, L - 1), seed) if cfg.draft_first else None
        engine = RSDEngine(policy, tok, draft, heads=make_heads(policy, J, seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        dense, ds = engine.decode_codes(obs, task, EngineConfig("dense"))
        codes, st = engine.decode_codes(obs, task, cfg)
        assert torch.equal(codes, dense), f"seed {seed}"
        assert ds.main_passes == L and st.layers == L
        fallbacks += st.fallbacks
        if not st.fallbacks:
            # every pass yields its accepted proposals and one layer more
            assert st.main_passes == L - st.accepted
            k = min(cfg.k or L, 3, L - 1) if cfg.draft_first else 0  # the draft's layers in the first pass
            assert passes_with_perfect_heads(L, per_pass, k) <= st.main_passes <= L
            heads_runs = st.draft_passes - cfg.draft_first  # the draft's one proposal, then the heads'
            assert heads_runs == st.main_passes - 1 or heads_runs == st.main_passes - 2
            assert st.accepted <= st.proposed
        accepted, proposed = accepted + st.accepted, proposed + st.proposed
    assert proposed > 0 and fallbacks <= 3
    if K ** Tp <= 16:  # random heads guess a whole layer often enough that acceptance ran too
        assert accepted > 0


@pytest.mark.parametrize("L", [3, 4, 6, 8])
def test_perfect_heads_are_always_accepted_and_cut_the_passes(L):
    """With heads proposing the dense codes, every proposal is accepted and a chunk of L layers
    takes 1 + ceil((L - 1) / (J + 1)) passes, for every J the policy allows."""
    tok = make_tokenizer(K=8, L=L, Tp=2)
    for J in range(1, L - 1):
        counted = 0
        for seed in range(6):
            engine = RSDEngine(make_policy(tok, seed=seed), tok)
            obs, task = random_obs(torch.Generator().manual_seed(seed))
            oracle_engine(engine, obs, task, J)
            dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
            codes, st = engine.decode_codes(obs, task, EngineConfig("heads"))
            assert torch.equal(codes, dense)
            if st.fallbacks:
                continue
            counted += 1
            assert st.main_passes == passes_with_perfect_heads(L, J), (L, J, seed)
            assert st.accepted == st.proposed == L - st.main_passes
            # the heads run after every pass that leaves two layers or more to decode
            assert st.draft_passes == st.main_passes - 1 - ((L - 1) % (J + 1) == 1)
        assert counted >= 5


@pytest.mark.parametrize("L, k", [(4, 1), (6, 3), (8, 3), (8, 7)])
def test_a_perfect_draft_and_perfect_heads_take_the_fewest_passes(L, k):
    """rsd+heads with a perfect draft of k layers and perfect heads: every proposal is accepted,
    and a chunk takes 1 + ceil((L - 1 - k) / (J + 1)) passes (2 for L = 8, k = 3, J = 3: a
    quarter of dense decoding's)."""
    tok = make_tokenizer(K=8, L=L, Tp=2)
    for J in range(1, L - 1):
        counted = 0
        for seed in range(6):
            engine = RSDEngine(make_policy(tok, seed=seed), tok, OracleDraft(k, 8))
            obs, task = random_obs(torch.Generator().manual_seed(seed))
            oracle_engine(engine, obs, task, J)
            dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
            engine.draft.set_codes(dense)
            codes, st = engine.decode_codes(obs, task, EngineConfig("rsd+heads"))
            assert torch.equal(codes, dense)
            if st.fallbacks:
                continue
            counted += 1
            assert st.main_passes == passes_with_perfect_heads(L, J, k), (L, k, J, seed)
            assert st.accepted == st.proposed == L - st.main_passes
        assert counted >= 5
    assert passes_with_perfect_heads(8, 3, 3) == 2


def test_the_folded_heads_propose_what_the_heads_propose():
    """``FusedHeads`` (the engine's inference form) gives ``DraftHeads.propose``'s codes for every
    layer and number of proposed layers, on random heads; the engine proposes through it, and a
    snapshot taken before the weights change proposes the old codes (why the engine's setter
    folds the heads again)."""
    for seed in range(30):
        L, J = 8, 3
        heads = pm.DraftHeads(pm.HeadsConfig(d_model=24, latent_steps=3, num_layers=L, codebook_sizes=(5, 16, 9, 16, 16, 7, 16, 16),
                                             offsets=J, hidden=16))
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.5)
        fused = heads.fused()
        g = torch.Generator().manual_seed(seed)
        for _ in range(5):
            hidden, code = torch.randn(2, 3, 24, generator=g), torch.randint(0, 5, (2, 3), generator=g)
            for layer in range(L - 1):
                for n in range(1, min(J, L - 1 - layer) + 1):
                    want = heads.propose(hidden, code, layer, n)
                    assert torch.equal(fused.propose(hidden, code, layer, n), want), (seed, layer, n)
                    assert all(int(want[..., j].max()) < heads.config.codebook_sizes[layer + j + 1] for j in range(n))
        with pytest.raises(ValueError, match="propose 1..3 layers after layer 6"):
            fused.propose(hidden, code, 6, 2)
    policy = make_policy(make_tokenizer(K=4, L=6, Tp=2))
    engine = RSDEngine(policy, make_tokenizer(K=4, L=6, Tp=2), heads=make_heads(policy, 3))
    assert isinstance(engine.heads_propose.__self__, pm.FusedHeads)
    hidden, code = torch.randn(1, 2, 32), torch.randint(0, 4, (1, 2))
    before = engine.heads_propose(hidden, code, 0, 3)
    with torch.no_grad():
        engine.heads.head_w.neg_()
    assert torch.equal(engine.heads_propose(hidden, code, 0, 3), before)
    engine.heads = engine.heads
    assert torch.equal(engine.heads_propose(hidden, code, 0, 3), engine.heads.propose(hidden, code, 0, 3))
    assert not torch.equal(engine.heads_propose(hidden, code, 0, 3), before)


def test_a_breach_of_acceptance_or_of_the_guard_would_be_seen(monkeypatch):
    """The exactness tests can fail: accepting every proposal, or taking choices without the tie
    guard off a near-tie, gives codes other than dense decoding's on these models."""
    tok = make_tokenizer(K=4, L=6, Tp=2)
    wrong = 0
    for seed in range(20):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, heads=make_heads(policy, 3, seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        with monkeypatch.context() as m:  # accept every proposal as it is
            m.setattr(RSDEngine, "_accept_greedy",
                      lambda self, p, proposal, k, cfg: ([proposal[..., l] for l in range(k)]
                                                         + [p[:, :, k].argmax(-1)], k))
            wrong += not torch.equal(engine.decode_codes(obs, task, EngineConfig("heads"))[0], dense)
    assert wrong > 0


@pytest.mark.parametrize("oracle", [False, True])
def test_near_ties_do_not_flip(oracle):
    """Where dense decoding's top two logits are within rounding, a multi-token pass may pick the
    other code: the heads mode sees the near-tie and decodes the chunk again densely. Without the
    margin, some of these near-ties do flip."""
    flipped = 0
    for seed in range(60):
        engine, obs, task, gap = near_tie_engine(seed, L=6)
        assert gap <= 1e-5
        if oracle:
            oracle_engine(engine, obs, task, 4)
        else:
            engine.heads = make_heads(engine.policy, 4, seed)
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        cfg = EngineConfig("heads")
        codes, st = engine.decode_codes(obs, task, cfg)
        assert torch.equal(codes, dense), f"seed {seed}"
        assert st.fallbacks == 1
        unguarded, _ = engine.decode_codes(obs, task, dataclasses.replace(cfg, tie_margin=0.0))
        flipped += not torch.equal(unguarded, dense)
    assert flipped > 0


# ---------------------------------------------------------------- adaptive depth

@pytest.mark.parametrize("pca", [False, True])
def test_heads_adaptive_keeps_adaptives_layers(pca):
    """heads+adaptive and rsd+heads+adaptive (every other seed) run the stop test on every kept
    layer in order: they keep exactly the
    layers and codes adaptive depth alone keeps, with the threshold set to dense decoding's own
    signal at some layer (a stop at the threshold, guarded) and to a middle value; some of the
    at-threshold stops flip without the margin."""
    L, flipped, stopped_inside = 6, 0, 0
    tok = make_pca_tokenizer(K=8, L=L, Tp=2) if pca else make_tokenizer(K=8, L=L, Tp=2)
    for seed in range(40):
        policy = make_policy(tok, seed=seed)
        engine = RSDEngine(policy, tok, make_draft(policy, 2, seed))
        obs, task = random_obs(torch.Generator().manual_seed(seed))
        logits, codes, _ = engine.dense_trace(obs[0].numpy(), int(task))
        signal = engine.expected_refinements(logits, codes)
        mode = ("heads+adaptive", "rsd+heads+adaptive")[seed % 2]
        for heads in (make_heads(policy, 3, seed), None):
            if heads is None:
                oracle_engine(engine, obs, task, 3)
            else:
                engine.heads = heads
            for tau in (float(signal[seed % (L - 1)]), float(signal[1:].mean())):
                cfg = EngineConfig("adaptive", adaptive_threshold=tau, min_layers=2)
                adaptive, _ = engine.decode_codes(obs, task, cfg)
                both, st = engine.decode_codes(obs, task, dataclasses.replace(cfg, mode=mode))
                assert torch.equal(both, adaptive), f"seed {seed}"
                if not st.fallbacks and adaptive.shape[-1] < L and st.accepted > 0:
                    stopped_inside += 1
                unguarded, _ = engine.decode_codes(obs, task, dataclasses.replace(cfg, mode=mode, tie_margin=0.0))
                flipped += not torch.equal(unguarded, adaptive)
    assert flipped > 0 and stopped_inside > 0


# ---------------------------------------------------------------- the mode grammar and checks

def test_heads_mode_specs_and_checks():
    assert core.split_spec("heads:2") == ("heads", "", 2, None)
    cfg = DecodingArgs(acceptance="relaxed").engine_config("heads+adaptive:3")
    assert (cfg.mode, cfg.acceptance, cfg.k, cfg.self_draft, cfg.adaptive, cfg.guarded, cfg.speculative) == (
        "heads+adaptive", "exact", 3, True, True, True, False)
    assert "heads" in core.parse_modes("all") and "heads+adaptive" in core.parse_modes("all")
    for bad in ("heads/2", "heads:0", "heads:x"):
        with pytest.raises(ValueError, match=r"MODE\[@ACCEPTANCE\]\[:K\]\[/C\]"):
            core.parse_modes(bad)
    with pytest.raises(ValueError, match="acceptance must be 'exact'"):
        DecodingArgs().engine_config("heads@relaxed")
    tok = make_tokenizer(K=8, L=5)
    policy = make_policy(tok)
    engine = RSDEngine(policy, tok)
    with pytest.raises(ValueError, match=r"--mode heads:2 needs self-drafting heads \(--heads\)"):
        engine.check_config(DecodingArgs().engine_config("heads:2"), "heads:2")
    engine = RSDEngine(policy, tok, heads=make_heads(policy, 2))
    with pytest.raises(ValueError, match="--mode heads:3: k = 3, but the heads propose at most 2"):
        engine.check_config(DecodingArgs().engine_config("heads:3"), "heads:3")
    # rsd+heads needs the draft too; its K counts the draft's layers and the heads' per pass
    cfg = DecodingArgs().engine_config("rsd+heads+adaptive:2")
    assert (cfg.self_draft, cfg.draft_first, cfg.speculative, cfg.adaptive, cfg.guarded) == (True,) * 5
    with pytest.raises(ValueError, match=r"--mode rsd\+heads needs a draft \(--draft\)"):
        engine.check_config(DecodingArgs().engine_config("rsd+heads"), "rsd+heads")
    with pytest.raises(ValueError, match=r"--mode rsd\+heads\+adaptive:2: k = 2, but the draft proposes at most 1"):
        RSDEngine(policy, tok, make_draft(policy, 1), heads=make_heads(policy, 2)).check_config(cfg, "rsd+heads+adaptive:2")
    RSDEngine(policy, tok, make_draft(policy, 2), heads=make_heads(policy, 2)).check_config(cfg, "rsd+heads+adaptive:2")
    other = make_policy(make_tokenizer(K=8, L=4), d=16)
    with pytest.raises(ValueError, match="the heads read a policy of width 16"):
        RSDEngine(policy, tok, heads=make_heads(other, 2))
    with pytest.raises(ValueError, match="offsets 3"):
        pm.HeadsConfig(d_model=32, latent_steps=2, num_layers=4, codebook_sizes=(8,) * 4, offsets=3)


# ---------------------------------------------------------------- checkpoints

def test_heads_save_reload_exact_and_another_policy_refused(tmp_path):
    tok = make_tokenizer(K=8, L=5)
    policy, other = make_policy(tok, seed=0), make_policy(tok, seed=1)
    pol, oth = str(tmp_path / "policy.pt"), str(tmp_path / "other.pt")
    pm.save_policy(policy, pol, "0" * 64, {})
    pm.save_policy(other, oth, "0" * 64, {})
    heads = make_heads(policy, 3, seed=2)
    path = str(tmp_path / "heads.pt")
    pm.save_heads(heads, path, pm.file_sha256(pol), {"seed": 2})
    loaded, ckpt = pm.load_heads(path, pol)
    assert ckpt["provenance"] == {"seed": 2} and loaded.config == heads.config
    obs, task = random_obs(torch.Generator().manual_seed(0))
    codes = policy.greedy_decode(obs, task)
    _, hidden = policy(obs, task, codes, hidden=True)
    assert torch.equal(heads(hidden, codes), loaded(hidden, codes))
    for layer in range(3):
        n = min(3, 5 - 1 - layer)
        assert torch.equal(heads.propose(hidden[:, :, layer], codes[..., layer], layer, n),
                           loaded.propose(hidden[:, :, layer], codes[..., layer], layer, n))
    with pytest.raises(ValueError, match="different main policy"):
        pm.load_heads(path, oth)
    with pytest.raises(ValueError, match="not a rsd_self_draft_heads checkpoint"):
        pm.load_heads(pol)
    with pytest.raises(ValueError, match="not a rsd_draft_model checkpoint"):
        pm.load_draft(path)


def test_the_hidden_states_are_those_the_logits_are_read_from():
    """extend(..., hidden=True) returns the same logits as extend, and the final hidden states
    that teacher forcing returns for the same blocks (what the heads are trained on)."""
    tok = make_tokenizer(K=8, L=5)
    policy = make_policy(tok)
    obs, task = random_obs(torch.Generator().manual_seed(3))
    codes = policy.greedy_decode(obs, task)
    full, full_h = policy(obs, task, codes, hidden=True)
    ctx = policy.embed_obs(obs, task)
    a, b = policy.new_cache(), policy.new_cache()
    plain = policy.extend(a, 0, 2, torch.cat([codes[..., :1], codes[..., :1]], -1), ctx)
    logits, h = policy.extend(b, 0, 2, torch.cat([codes[..., :1], codes[..., :1]], -1), ctx, hidden=True)
    assert torch.equal(plain, logits) and h.shape == (1, 2, 2, 32)
    torch.testing.assert_close(h, full_h[:, :, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, full[:, :, :2], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training

def test_training_heads_on_a_tiny_policy_beats_chance_and_runs_in_the_engine(trained, tmp_path):
    """train_draft.py --heads distils heads from the frozen policy's own greedy codes: on the
    validation episodes they agree with it more often than always proposing the most frequent
    code; the checkpoint is bound to the policy, and the engine built with it decodes dense
    greedy decoding's codes (with rollouts of the policy as extra states)."""
    d, _, _ = trained
    policy_path = d / "policy.pt"
    policy, _ = pm.load_policy(str(policy_path))
    tok = load_tokenizer(str(d / "tok.pt"))[0]
    rollouts = rollout_file(tmp_path / "rollouts.hdf5", policy, tok, init_states=[50, 51, 52], n=6)
    out, js = tmp_path / "heads.pt", tmp_path / "heads.json"
    before = policy.state_dict()
    result = train_draft.main(draft_args(policy_path, out, "--heads", "1", "--epochs", "40", "--heads_hidden", "32",
                                         "--threads", "1", "--json", str(js), "--rollouts", str(rollouts)))
    assert result["heads"] == 1 and len(result["agreement"]) == 1 and len(result["history"]) == 40
    assert result["layer_agreement"][0] > result["majority_layer_agreement"][0] + 0.05, result
    assert result["agreement"][0] > 1 / 16 and "rollout_layer_agreement" in result
    # one source layer (0) and one offset on a 3-layer policy: a pass accepts at most one proposal
    assert result["most_accepted_per_pass"] == 1.0
    assert result["expected_accepted_per_pass"] == pytest.approx(result["layer_agreement"][0])
    assert json.loads(js.read_text())["best_epoch"] == result["best_epoch"]
    heads, ckpt = pm.load_heads(str(out), str(policy_path))
    assert ckpt["provenance"]["metrics"]["layer_agreement"] == result["layer_agreement"]
    assert all(torch.equal(v, before[k]) for k, v in pm.load_policy(str(policy_path))[0].state_dict().items())
    engine = core.build_engine(str(policy_path), heads=str(out))
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    for _ in range(20):
        obs, task = torch.randn(1, policy.config.obs_dim, generator=gen), torch.randint(0, 2, (1,), generator=gen)
        dense, _ = engine.decode_codes(obs, task, EngineConfig("dense"))
        codes, st = engine.decode_codes(obs, task, EngineConfig("heads"))
        assert torch.equal(codes, dense)
        accepted += st.accepted
    assert accepted > 0
    with pytest.raises(ValueError, match="propose 1..1 layers ahead"):
        train_draft.main(draft_args(policy_path, tmp_path / "h2.pt", "--heads", "2", "--epochs", "1"))


# ---------------------------------------------------------------- bench_decoding

def test_bench_decoding_with_perfect_heads_accepts_every_proposal(trained, tmp_path):
    """--oracle_heads beside --oracle_draft: on the 3-layer policy, heads:1 takes the first pass,
    then one pass that accepts the proposal of layer 1 and predicts layer 2, the codes dense
    decoding's; heads+adaptive keeps adaptive's codes."""
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok = load_tokenizer(str(d / "tok.pt"))[0]
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    args = bench_decoding.build_parser().parse_args(
        ["--policy", str(d / "policy.pt"), "--oracle_draft", "--oracle_heads", "--data", str(roll), "--warmup", "1",
         "--mode", "rsd:2,heads:1,adaptive,heads+adaptive", "--adaptive_threshold", "0.2"])
    result = bench_decoding.main(args)
    modes = result["modes"]
    assert result["heads"].startswith("oracle") and result["draft"].startswith("oracle")
    h = modes["heads:1"]
    assert h["main_passes_per_chunk"] == passes_with_perfect_heads(3, 1) == 2
    assert h["acceptance_rate"] == 1.0 and h["accepted_layers_per_chunk"] == 1 and h["draft_passes_per_chunk"] == 1
    assert h["same_codes_as_dense"] == 1.0 and h["fallbacks_per_chunk"] == 0
    assert modes["rsd:2"]["main_passes_per_chunk"] == 1
    assert modes["heads+adaptive"]["layers_per_chunk"] == modes["adaptive"]["layers_per_chunk"]
    assert modes["heads+adaptive"]["action_gap_vs_dense_max"] == modes["adaptive"]["action_gap_vs_dense_max"]
    with pytest.raises(ValueError, match="--heads or --oracle_heads, not both"):
        dataclasses.replace(args, heads="heads.pt")
    with pytest.raises(ValueError, match="needs self-drafting heads"):
        bench_decoding.main(dataclasses.replace(args, oracle_heads=False, mode=["heads"]))
