"""train_policy.py, train_draft.py and the action history, on a tiny synthetic dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import demos
import policy_models as pm
import train_draft
import train_policy
from fileio import file_sha256
from policy_fixtures import (INSTRUCTIONS, FakeEnv, draft_args, policy_args, rollout_file,  # noqa: F401
                             synthetic_demo_file, trained, workdir)
from rsd_engine_core import EngineConfig, EnginePolicy, RSDEngine
from rvq_tokenizer import load_tokenizer, save_tokenizer

# ---------------------------------------------------------------- train_policy


def test_policy_training_drives_loss_down_and_saves_best(trained):
    d, _, result = trained
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert len(result["val_token_accuracy"]) == 3
    saved = json.loads((d / "policy.json").read_text())
    assert saved["val_action_mse"] == min(h["val"]["action_mse"] for h in result["history"])
    assert (d / "policy_history.png").exists()
    # the best epoch sits in <output>.incomplete while training runs; at the end it is the output
    assert not (d / "policy.pt.incomplete").exists()
    policy, ckpt = pm.load_policy(str(d / "policy.pt"), str(d / "tok.pt"))
    assert ckpt["provenance"]["metrics"]["best_epoch"] == result["best_epoch"]
    assert ckpt["provenance"]["complete"] is True
    val_keys = {e["key"] for e in ckpt["provenance"]["data"]["val_episodes"]}
    train_keys = {e["key"] for e in ckpt["provenance"]["data"]["train_episodes"]}
    assert val_keys and not val_keys & train_keys  # split by episode


def test_batched_greedy_decode_equals_engine_dense(trained):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    obs = torch.randn(5, policy.config.obs_dim)
    task = torch.tensor([0, 1, 0, 1, 1])
    batch = policy.greedy_decode(obs, task)
    for i in range(5):
        codes, stats = engine.decode_codes(obs[i:i + 1], task[i:i + 1], EngineConfig("dense"))
        assert torch.equal(codes, batch[i:i + 1]) and stats.main_passes == 3


def test_targets_select_what_the_policy_imitates(workdir, tmp_path):
    """--targets expert_actions trains on the expert's own commands of a perturbed collection."""
    from dataclasses import replace

    from policy_data import build_dataset

    d, path = workdir
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    eps = demos.load_episodes(path)[:3]
    labelled = [replace(e, expert_actions=0.5 * e.actions) for e in eps]
    keys = ("robot0_proprio-state", "object-state")
    executed = build_dataset(labelled, tok, keys, INSTRUCTIONS)
    expert = build_dataset(labelled, tok, keys, INSTRUCTIONS, targets="expert_actions")
    torch.testing.assert_close(expert.actions, 0.5 * executed.actions)
    assert torch.equal(expert.codes, tok.encode(expert.actions))
    assert not torch.equal(expert.codes, executed.codes)
    torch.testing.assert_close(expert.obs, executed.obs)  # same observations, other targets
    with pytest.raises(ValueError, match="demo_0 has no expert_actions"):
        train_policy.main(policy_args(d, path, targets="expert_actions",
                                      output=str(tmp_path / "p.pt"), json=None))
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "p.pt.incomplete").exists()


def test_init_continues_a_policy_and_keeps_its_split(trained, tmp_path):
    """--init (a DAgger round): starts from the given policy's weights and normalization, keeps
    its train/validation sides for the episodes it has seen, and refuses data or flags it
    cannot take."""
    d, path, first = trained
    more = synthetic_demo_file(tmp_path / "more.hdf5", n_episodes=8, seed=1)
    out = str(tmp_path / "p1.pt")
    result = train_policy.main(policy_args(d, path, data=[path, more], init=str(d / "policy.pt"),
                                           epochs=2, output=out, json=None))
    # warm: its first epoch is already far below the fresh policy's first epoch
    assert result["history"][0]["train_loss"] < 0.8 * first["history"][0]["train_loss"]
    old, old_ckpt = pm.load_policy(str(d / "policy.pt"))
    new, new_ckpt = pm.load_policy(out)
    torch.testing.assert_close(new.obs_encoder.normalizer.mean, old.obs_encoder.normalizer.mean)
    key = demos.episode_key
    old_data, new_data = old_ckpt["provenance"]["data"], new_ckpt["provenance"]["data"]
    new_val = {key(e) for e in new_data["val_episodes"]}
    assert {key(e) for e in old_data["val_episodes"]} <= new_val
    assert not {key(e) for e in old_data["train_episodes"]} & new_val
    assert any(e["source"].endswith("more.hdf5") for e in new_data["val_episodes"])  # new ones split too
    assert new_ckpt["provenance"]["init"]["sha256"] == file_sha256(str(d / "policy.pt"))

    with pytest.raises(ValueError, match="--action_history"):
        train_policy.main(policy_args(d, path, init=str(d / "policy.pt"), action_history=2,
                                      output=str(tmp_path / "p2.pt"), json=None))
    other = synthetic_demo_file(tmp_path / "other.hdf5", n_episodes=4, instructions=("open the drawer",))
    with pytest.raises(ValueError, match="without the instruction.*open the drawer"):
        train_policy.main(policy_args(d, other, init=str(d / "policy.pt"),
                                      output=str(tmp_path / "p3.pt"), json=None))
    assert not os.path.exists(tmp_path / "p2.pt") and not os.path.exists(tmp_path / "p3.pt")
    # a starting policy that trained on every episode given leaves nothing to validate on
    every = [demos.episode_identity(e) for e in demos.load_episodes(more)]
    seen_all = {"config": new_ckpt["config"], "provenance": {"data": {"train_episodes": every, "val_episodes": []}}}
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    with pytest.raises(ValueError, match="no validation episode left"):
        train_policy.load_data(policy_args(d, more, init=out), tok, seen_all)
    before = file_sha256(out)
    with pytest.raises(ValueError, match="--output .* is also --init: writing it would overwrite an input"):
        train_policy.main(policy_args(d, path, init=out, output=out, json=None))
    assert file_sha256(out) == before


def test_policy_output_is_written_only_when_training_ends(workdir, tmp_path, monkeypatch):
    """The best epoch so far sits in <output>.incomplete (marked incomplete); --output itself, and
    a checkpoint already there, is only replaced when training ends."""
    d, path = workdir
    out = tmp_path / "p.pt"
    out.write_bytes(b"an earlier checkpoint")
    real = train_policy.check_finite_metrics

    def diverge_at_epoch_3(epoch, *a):
        if epoch == 3:
            raise ValueError("training diverged at epoch 3 (simulated)")
        return real(epoch, *a)

    monkeypatch.setattr(train_policy, "check_finite_metrics", diverge_at_epoch_3)
    with pytest.raises(ValueError, match="diverged at epoch 3"):
        train_policy.main(policy_args(d, path, output=str(out), json=None, epochs=4))
    assert out.read_bytes() == b"an earlier checkpoint"
    _, ckpt = pm.load_policy(str(out) + ".incomplete", str(d / "tok.pt"))
    assert ckpt["provenance"]["complete"] is False and ckpt["provenance"]["metrics"]["best_epoch"] in (1, 2)


def test_policy_refuses_wrong_tokenizer(trained, tmp_path):
    d, _, _ = trained
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    save_tokenizer(tok, str(tmp_path / "tok2.pt"), {"another": "run"})
    with pytest.raises(ValueError, match="different tokenizer"):
        pm.load_policy(str(d / "policy.pt"), str(tmp_path / "tok2.pt"))


# ---------------------------------------------------------------- train_draft


def test_draft_training_reports_agreement_and_refuses_other_policy(trained, tmp_path):
    d, path, _ = trained
    result = train_draft.main(draft_args(d / "policy.pt", d / "draft.pt", "--json", str(d / "draft.json"),
                                         "--k", "2", "--epochs", "8", "--hidden", "64", "--threads", "1"))
    assert len(result["agreement"]) == 2 and set(result["candidates"]) == {"embedding", "obs"}
    assert result["source"] in ("embedding", "obs")
    # distillation learned something: better than always predicting the most common code
    assert min(result["agreement"]) > 0.3
    assert result["draft_main_cost_ratio"] > 0 and result["draft_pass_flops"] > 0
    top1 = result["main_top1_prob"]  # the main policy's confidence along its greedy path
    assert len(top1) == 3 and all(1 / 16 <= p <= 1 for p in top1)
    assert json.loads((d / "draft.json").read_text())["agreement"] == result["agreement"]
    draft, _ = pm.load_draft(str(d / "draft.pt"), str(d / "policy.pt"))
    # a policy retrained with another seed is another policy: the pair is refused
    other = policy_args(d, path, output=str(tmp_path / "other.pt"), json=None, epochs=1, seed=1)
    train_policy.main(other)
    with pytest.raises(ValueError, match="different main policy"):
        pm.load_draft(str(d / "draft.pt"), str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="--step_hidden 16: .* with --chained"):
        train_draft.main(draft_args(d / "policy.pt", tmp_path / "d.pt", "--step_hidden", "16"))
    assert not (tmp_path / "d.pt").exists()


def test_draft_distills_on_rollouts_and_refuses_held_out_init_states(trained, tmp_path):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    roll = rollout_file(tmp_path / "roll.hdf5", policy, tok, init_states=[20, 21, 22])
    base = ["--k", "2", "--epochs", "6", "--hidden", "64", "--threads", "1", "--source", "embedding"]
    result = train_draft.main(draft_args(d / "policy.pt", tmp_path / "draft.pt", *base, "--rollouts", roll))
    # failed rollouts count too: 10 episodes x (24 - 10 + 1) chunks, 1 episode held out
    assert result["rollout_chunks"] == {"train": 9 * 15, "val": 15}
    assert len(result["rollout_agreement"]) == 2 and min(result["rollout_agreement"]) > 0.3
    ckpt = torch.load(str(tmp_path / "draft.pt"), weights_only=True)
    assert ckpt["provenance"]["args"]["rollouts"] == [roll]
    bad = rollout_file(tmp_path / "bad.hdf5", policy, tok, init_states=[20, 3])
    with pytest.raises(ValueError, match="bad.hdf5.*held-out init state 3"):
        train_draft.main(draft_args(d / "policy.pt", tmp_path / "draft2.pt", *base, "--rollouts", bad))
    assert not (tmp_path / "draft2.pt").exists()


def test_expected_acceptance_counts_the_leading_agreeing_layers():
    """Exact rsd accepts the leading run of whole layers that agree: a later agreeing layer
    after a disagreeing one does not count."""
    targets = torch.tensor([[[1, 2, 3], [4, 5, 6]]] * 3)  # [M=3, T'=2, k=3]
    pred = targets.clone()
    pred[1, 0, 1] = 0   # chunk 1: layer 0 agrees, layer 1 differs at one position, layer 2 agrees
    pred[2, 1, 0] = 0   # chunk 2: layer 0 differs

    class Fixed(torch.nn.Module):
        def forward(self, feats, task, codes=None):
            return torch.nn.functional.one_hot(pred[feats.long().squeeze(1)], 8).float()

    per_pos, per_layer, acc = train_draft.agreement(Fixed(), torch.arange(3.0)[:, None],
                                                    torch.zeros(3, dtype=torch.long), targets)
    assert per_layer == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert per_pos == pytest.approx([5 / 6, 5 / 6, 1.0])
    assert acc == pytest.approx((3 + 1 + 0) / 3 / 3)


# ---------------------------------------------------------------- action history


def test_action_history_online_equals_training_rows():
    """The history a rollout feeds the policy at the start of each chunk is the row the
    training set pairs with that step: the last h executed actions, settle action before t=0."""
    from policy_data import ActionHistory, action_history

    acts = np.random.default_rng(0).normal(size=(23, 7)).astype(np.float32)
    rows = action_history(acts, 3)
    assert rows.shape == (23, 21)
    np.testing.assert_array_equal(rows[0], np.tile(demos.SETTLE_ACTION.astype(np.float32), 3))
    np.testing.assert_array_equal(rows[5], acts[2:5].reshape(-1))
    np.testing.assert_array_equal(rows[1][14:], acts[0])
    online, t = ActionHistory(3), 0
    for n in (1, 4, 2, 10, 6):  # chunks of any length
        np.testing.assert_array_equal(online.vector(), rows[t])
        online.push(acts[t:t + n])
        t += n
    online.reset()
    np.testing.assert_array_equal(online.vector(), rows[0])
    assert action_history(acts, 0).shape == (23, 0) and ActionHistory(0).vector().shape == (0,)
    with pytest.raises(ValueError, match="action_history must be an integer >= 0"):
        pm.PolicyConfig(obs_dim=4, instructions=INSTRUCTIONS, latent_steps=2, num_layers=3,
                        codebook_sizes=(16,) * 3, action_history=-1)
    with pytest.raises(ValueError, match="--action_history must be >= 0"):
        train_policy.build_parser().parse_args(["--data", "x.hdf5", "--tokenizer", "t.pt",
                                                "--action_history", "-1"])


def test_policy_with_action_history_trains_and_runs_in_the_eval_loop(workdir, tmp_path):
    """--action_history 2: the observation grows by 2 x 7, the draft follows, and the closed
    loop's EnginePolicy appends what it executed (the engine sees the full vector)."""
    d, path = workdir
    pol = policy_args(d, path, output=str(tmp_path / "p.pt"), json=None, epochs=2, action_history=2)
    train_policy.main(pol)
    policy, _ = pm.load_policy(str(tmp_path / "p.pt"))
    assert policy.config.action_history == 2 and policy.config.obs_dim == 8 + 6 + 14
    train_draft.main(draft_args(tmp_path / "p.pt", tmp_path / "d.pt", "--k", "2", "--epochs", "1",
                                "--hidden", "16", "--source", "obs", "--threads", "1"))
    draft, _ = pm.load_draft(str(tmp_path / "d.pt"), str(tmp_path / "p.pt"))
    assert draft.config.in_dim == 8 + 6 + 14 + 32  # the draft reads the full vector (+ task embedding)
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    seen = []
    act = engine.act
    engine.act = lambda x, *a: (seen.append(x.copy()), act(x, *a))[1]
    ep_policy = EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0)
    ep_policy.reset(FakeEnv().task, np.random.default_rng(0))
    first = ep_policy.act(FakeEnv((8, 6))._obs())
    ep_policy.act(FakeEnv((8, 6))._obs())
    assert [len(x) for x in seen] == [28, 28]
    np.testing.assert_array_equal(seen[0][14:], np.tile(demos.SETTLE_ACTION.astype(np.float32), 2))
    np.testing.assert_allclose(seen[1][14:], first[-2:].reshape(-1), rtol=1e-6)


def test_one_cycle_schedule_is_the_usual_one_and_survives_short_runs():
    """Runs of 40 steps or more keep OneCycleLR with a 5% warm-up exactly; shorter runs, which made
    OneCycleLR divide by zero (a warm-up of one step), warm up over two steps or stay constant."""
    from policy_data import one_cycle

    def rates(make, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt, total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    usual = lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=total, pct_start=0.05)
    assert rates(lambda opt, total: one_cycle(opt, 0.1, total), 60) == rates(usual, 60)
    with pytest.raises(ZeroDivisionError):
        rates(usual, 20)
    short = rates(lambda opt, total: one_cycle(opt, 0.1, total), 20)
    assert max(short) == pytest.approx(0.1) and short[-1] < 0.01
    assert rates(lambda opt, total: one_cycle(opt, 0.1, total), 3) == [0.1, 0.1, 0.1]


def test_fixture_state_holds_each_fixtures_position_and_joints_in_name_order():
    """"fixture-state": fixtures sorted by name, position then joints; objects (they have a
    _to_robot0_eef_pos), regions (no _quat) and the robot are not fixtures."""
    from types import SimpleNamespace
    from policy_data import FIXTURE_STATE, fixture_names, obs_vector, obs_widths
    n = 4
    obs = {"robot0_eef_pos": np.zeros((n, 3)), "robot0_eef_quat": np.zeros((n, 4)),
           "bowl_1_pos": np.ones((n, 3)), "bowl_1_quat": np.ones((n, 4)),
           "bowl_1_to_robot0_eef_pos": np.ones((n, 3)), "bowl_1_to_robot0_eef_quat": np.ones((n, 4)),
           "wooden_cabinet_1_pos": np.full((n, 3), 2.0), "wooden_cabinet_1_quat": np.zeros((n, 4)),
           "wooden_cabinet_1_qpos": np.arange(3 * n, dtype=float).reshape(n, 3),
           "flat_stove_1_pos": np.full((n, 3), 3.0), "flat_stove_1_quat": np.zeros((n, 4)),
           "flat_stove_1_qpos": np.full((n, 1), 0.5), "flat_stove_1_cook_region_pos": np.full((n, 3), 9.0)}
    assert fixture_names(obs) == ["flat_stove_1", "wooden_cabinet_1"]
    x = obs_vector(obs, ["robot0_eef_pos", FIXTURE_STATE])
    assert x.shape == (n, 3 + 4 + 6)
    np.testing.assert_array_equal(x[:, 3:7], np.tile([3, 3, 3, 0.5], (n, 1)))
    np.testing.assert_array_equal(x[:, 7:10], 2.0)
    np.testing.assert_array_equal(x[:, 10:], obs["wooden_cabinet_1_qpos"])
    one_step = {k: v[2] for k, v in obs.items()}  # a live observation: one step, the same vector
    np.testing.assert_array_equal(obs_vector(one_step, ["robot0_eef_pos", FIXTURE_STATE]), x[2])
    recorded = {**obs, FIXTURE_STATE: np.full((n, 2), 7.0)}  # a recorded key is read as it is
    np.testing.assert_array_equal(obs_vector(recorded, [FIXTURE_STATE]), 7.0)
    # a scene without fixtures (half of libero_10's) has no values: zeros up to the key's width
    no_fixtures = {k: v for k, v in obs.items() if "cabinet" not in k and "stove" not in k}
    keys = ["robot0_eef_pos", FIXTURE_STATE]
    np.testing.assert_array_equal(obs_vector(no_fixtures, keys, widths=(3, 7)), np.zeros((n, 10)))
    live = {k: v[0] for k, v in no_fixtures.items()}
    np.testing.assert_array_equal(obs_vector(live, keys, widths=(3, 7)), np.zeros(10))
    assert obs_widths([SimpleNamespace(obs=obs), SimpleNamespace(obs=no_fixtures)], keys) == (3, 10)
    with pytest.raises(ValueError, match="'fixture-state' has no values in any episode"):
        obs_widths([SimpleNamespace(obs=no_fixtures)], keys)
    with pytest.raises(KeyError, match="'fixture-state' alone"):
        obs_vector(no_fixtures, [FIXTURE_STATE])


def test_scenes_of_different_object_counts_share_one_policy(workdir, tmp_path):
    """Demos from two scenes, 6 and 4 object values: every key is zero-padded to its widest, in
    training, in the draft's data and in the closed loop; a scene wider than any trained on is refused."""
    d, path = workdir
    narrow = synthetic_demo_file(tmp_path / "narrow.hdf5", seed=1, obs_dims=(8, 4))
    out = tmp_path / "p.pt"
    train_policy.main(policy_args(d, path, data=[str(path), str(narrow)], output=str(out), json=None, epochs=2))
    policy, _ = pm.load_policy(str(out))
    assert policy.config.obs_widths == (8, 6) and policy.config.obs_dim == 14
    train_draft.main(draft_args(out, tmp_path / "d.pt", "--k", "2", "--epochs", "1", "--hidden", "16",
                                "--source", "obs", "--threads", "1"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    seen = []
    act = engine.act
    engine.act = lambda x, *a: (seen.append(x.copy()), act(x, *a))[1]
    ep_policy = EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0)
    ep_policy.reset(FakeEnv().task, np.random.default_rng(0))
    obs = {"robot0_proprio-state": np.full(8, 0.5, np.float32), "object-state": np.arange(1, 5, dtype=np.float32)}
    ep_policy.act(obs)
    np.testing.assert_array_equal(seen[0], [0.5] * 8 + [1, 2, 3, 4, 0, 0])
    with pytest.raises(ValueError, match="'object-state' has 7 values, more than the 6"):
        ep_policy.act({**obs, "object-state": np.zeros(7, np.float32)})
