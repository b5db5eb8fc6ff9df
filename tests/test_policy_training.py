"""train_policy.py, train_draft.py and eval_libero.py on a tiny synthetic dataset."""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import h5py
import numpy as np
import pytest
import torch

import bench_decoding
import collect_actions as ca
import eval_libero
import policy_models as pm
import train_draft
import train_policy
import train_stop
from rsd_engine_core import EngineConfig, LearnedStop, RSDEngine
from rvq_tokenizer import RVQConfig, RVQTokenizer, load_tokenizer, save_tokenizer, synthetic_episodes

INSTRUCTIONS = ("put the bowl on the plate", "put the bowl on the stove")


def synthetic_demo_file(path, n_episodes=12, seed=0, instructions=INSTRUCTIONS, obs_dims=(8, 6)):
    """Episodes whose actions follow their observations, so a policy can learn them."""
    rng = np.random.default_rng(seed)
    w = ca.DemoWriter(str(path), {"suite": "libero_spatial"})
    for i, actions in enumerate(synthetic_episodes(n_episodes, seed=seed)):
        n = len(actions)
        # proprio: the cumulative motion so far (a state the actions depend on) + phase clock
        proprio = np.concatenate([np.cumsum(actions, 0), np.linspace(0, 1, n)[:, None]], 1)
        proprio = np.pad(proprio, ((0, 0), (0, obs_dims[0] - 8)))
        objects = np.repeat(rng.normal(size=(1, obs_dims[1])), n, 0)
        ep = ca.Episode(actions=actions, obs={"robot0_proprio-state": proprio, "object-state": objects},
                        success=True, task_suite="libero_spatial", task_id=i % len(instructions),
                        instruction=instructions[i % len(instructions)], init_state_id=20 + i, seed=i)
        w.add(ep)
    return w.finish()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    demos = synthetic_demo_file(d / "demos.hdf5")
    torch.manual_seed(0)
    tok = RVQTokenizer(RVQConfig(chunk_size=10, latent_steps=2, num_layers=3, codebook_size=16,
                                 hidden_dim=32))
    chunks = ca.chunk_actions(ca.load_episodes(demos), 10)
    tok.normalizer.fit(torch.from_numpy(chunks).reshape(-1, 7))
    tok.init_codebooks(torch.from_numpy(chunks))
    save_tokenizer(tok.eval(), str(d / "tok.pt"), {"test": True})
    return d, demos


def policy_args(d, demos, **over):
    args = train_policy.build_parser().parse_args([
        "--data", demos, "--tokenizer", str(d / "tok.pt"), "--output", str(d / "policy.pt"),
        "--json", str(d / "policy.json"), "--epochs", "25", "--d_model", "32", "--n_blocks", "2",
        "--n_heads", "2", "--obs_tokens", "2", "--batch_size", "64", "--val_fraction", "0.2",
        "--threads", "1", "--dropout", "0.0"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def trained(workdir):
    d, demos = workdir
    result = train_policy.main(policy_args(d, demos))
    return d, demos, result


def test_policy_training_drives_loss_down_and_saves_best(trained):
    d, _, result = trained
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert len(result["val_token_accuracy"]) == 3
    saved = json.loads((d / "policy.json").read_text())
    assert saved["val_action_mse"] == min(h["val"]["action_mse"] for h in result["history"])
    assert (d / "policy_history.png").exists()
    policy, ckpt = pm.load_policy(str(d / "policy.pt"), str(d / "tok.pt"))
    assert ckpt["provenance"]["metrics"]["best_epoch"] == result["best_epoch"]
    val_keys = {e["key"] for e in ckpt["provenance"]["data"]["val_episodes"]}
    train_keys = {e["key"] for e in ckpt["provenance"]["data"]["train_episodes"]}
    assert val_keys and not val_keys & train_keys  # split by episode


def test_batched_greedy_decode_equals_engine_dense(trained):
    d, demos, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    obs = torch.randn(5, policy.config.obs_dim)
    task = torch.tensor([0, 1, 0, 1, 1])
    batch = policy.greedy_decode(obs, task)
    for i in range(5):
        codes, stats = engine.decode_codes(obs[i:i + 1], task[i:i + 1], EngineConfig("dense"))
        assert torch.equal(codes, batch[i:i + 1]) and stats.main_passes == 3


def test_draft_training_reports_agreement_and_refuses_other_policy(trained, tmp_path):
    d, demos, _ = trained
    args = train_draft.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--output", str(d / "draft.pt"), "--json", str(d / "draft.json"),
        "--k", "2", "--epochs", "8", "--hidden", "64", "--threads", "1"])
    result = train_draft.main(args)
    assert len(result["agreement"]) == 2 and set(result["candidates"]) == {"embedding", "obs"}
    assert result["source"] in ("embedding", "obs")
    # distillation learned something: better than always predicting the most common code
    assert min(result["agreement"]) > 0.3
    assert result["draft_main_cost_ratio"] > 0 and result["draft_pass_flops"] > 0
    top1 = result["main_top1_prob"]  # the main policy's confidence along its greedy path
    assert len(top1) == 3 and all(1 / 16 <= p <= 1 for p in top1)
    draft, _ = pm.load_draft(str(d / "draft.pt"), str(d / "policy.pt"))
    # a policy retrained with another seed is another policy: the pair is refused
    other = policy_args(d, demos, output=str(tmp_path / "other.pt"), json=None, epochs=1, seed=1)
    train_policy.main(other)
    with pytest.raises(ValueError, match="different main policy"):
        pm.load_draft(str(d / "draft.pt"), str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="--step_hidden 16: .* with --chained"):
        train_draft.main(train_draft.build_parser().parse_args([
            "--policy", str(d / "policy.pt"), "--output", str(tmp_path / "d.pt"), "--step_hidden", "16"]))
    assert not (tmp_path / "d.pt").exists()


def test_targets_select_what_the_policy_imitates(workdir, tmp_path):
    """--targets expert_actions trains on the expert's own commands of a perturbed collection."""
    from dataclasses import replace

    from policy_data import build_dataset

    d, demos = workdir
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    eps = ca.load_episodes(demos)[:3]
    labelled = [replace(e, expert_actions=0.5 * e.actions) for e in eps]
    keys = ("robot0_proprio-state", "object-state")
    executed = build_dataset(labelled, tok, keys, INSTRUCTIONS)
    expert = build_dataset(labelled, tok, keys, INSTRUCTIONS, targets="expert_actions")
    torch.testing.assert_close(expert.actions, 0.5 * executed.actions)
    assert torch.equal(expert.codes, tok.encode(expert.actions))
    assert not torch.equal(expert.codes, executed.codes)
    torch.testing.assert_close(expert.obs, executed.obs)  # same observations, other targets
    with pytest.raises(ValueError, match="demo_0 has no expert_actions"):
        train_policy.main(policy_args(d, demos, targets="expert_actions",
                                      output=str(tmp_path / "p.pt"), json=None))


def test_init_continues_a_policy_and_keeps_its_split(trained, tmp_path):
    """--init (a DAgger round): starts from the given policy's weights and normalization, keeps
    its train/validation sides for the episodes it has seen, and refuses data or flags it
    cannot take."""
    d, demos, first = trained
    more = synthetic_demo_file(tmp_path / "more.hdf5", n_episodes=8, seed=1)
    out = str(tmp_path / "p1.pt")
    result = train_policy.main(policy_args(d, demos, data=[demos, more], init=str(d / "policy.pt"),
                                           epochs=2, output=out, json=None))
    # warm: its first epoch is already far below the fresh policy's first epoch
    assert result["history"][0]["train_loss"] < 0.8 * first["history"][0]["train_loss"]
    old, old_ckpt = pm.load_policy(str(d / "policy.pt"))
    new, new_ckpt = pm.load_policy(out)
    torch.testing.assert_close(new.obs_encoder.normalizer.mean, old.obs_encoder.normalizer.mean)
    key = ca.episode_key
    old_data, new_data = old_ckpt["provenance"]["data"], new_ckpt["provenance"]["data"]
    new_val = {key(e) for e in new_data["val_episodes"]}
    assert {key(e) for e in old_data["val_episodes"]} <= new_val
    assert not {key(e) for e in old_data["train_episodes"]} & new_val
    assert any(e["source"].endswith("more.hdf5") for e in new_data["val_episodes"])  # new ones split too
    assert new_ckpt["provenance"]["init"]["sha256"] == pm.file_sha256(str(d / "policy.pt"))

    with pytest.raises(ValueError, match="--action_history"):
        train_policy.main(policy_args(d, demos, init=str(d / "policy.pt"), action_history=2,
                                      output=str(tmp_path / "p2.pt"), json=None))
    other = synthetic_demo_file(tmp_path / "other.hdf5", n_episodes=4, instructions=("open the drawer",))
    with pytest.raises(ValueError, match="without the instruction.*open the drawer"):
        train_policy.main(policy_args(d, other, init=str(d / "policy.pt"),
                                      output=str(tmp_path / "p3.pt"), json=None))
    assert not os.path.exists(tmp_path / "p2.pt") and not os.path.exists(tmp_path / "p3.pt")
    # a starting policy that trained on every episode given leaves nothing to validate on
    every = [ca.episode_identity(e) for e in ca.load_episodes(more)]
    seen_all = {"config": new_ckpt["config"], "provenance": {"data": {"train_episodes": every, "val_episodes": []}}}
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    with pytest.raises(ValueError, match="no validation episode left"):
        train_policy.load_data(policy_args(d, more, init=out), tok, seen_all)
    before = pm.file_sha256(out)
    with pytest.raises(ValueError, match="--output .* would overwrite --init"):
        train_policy.main(policy_args(d, demos, init=out, output=out, json=None))
    assert pm.file_sha256(out) == before


def test_policy_refuses_wrong_tokenizer(trained, tmp_path):
    d, _, _ = trained
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    save_tokenizer(tok, str(tmp_path / "tok2.pt"), {"another": "run"})
    with pytest.raises(ValueError, match="different tokenizer"):
        pm.load_policy(str(d / "policy.pt"), str(tmp_path / "tok2.pt"))


# ---------------------------------------------------------------- eval loop without a simulator

class FakeEnv:
    """Just enough of LiberoEnv for run_trial: succeeds after 12 steps; obs have the keys."""

    def __init__(self, obs_dims=(7, 6)):
        self.task = ca.TaskInfo("libero_spatial", 0, "t", INSTRUCTIONS[0], "", 40)
        self.dims = obs_dims
        self.t = 0

    def _obs(self):
        return {"robot0_proprio-state": np.full(self.dims[0], self.t * 0.1, np.float32),
                "object-state": np.zeros(self.dims[1], np.float32)}

    def reset(self, init_state_id, scene_seed=None):
        self.t = 0
        return self._obs()

    def step(self, action):
        self.t += 1
        return self._obs(), self.t >= 12

    def close(self):
        pass


class Exploding(ca.Policy):
    def reset(self, task, rng):
        pass

    def act(self, obs):
        raise RuntimeError("simulated policy crash")


class NamedPolicy(ca.Policy):
    """A policy known by its mode's name, returning a constant 4-step chunk."""

    def __init__(self, name, value=0.0):
        self.name, self.value = name, value

    def reset(self, task, rng):
        pass

    def act(self, obs):
        return np.full((4, 7), self.value)


def eval_args(**over):
    args = eval_libero.build_parser().parse_args(["--num_trials", "3"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def run_trials(env, policy, mode, args):
    """Trials 0..num_trials-1 of one task with one policy, as evaluate_task runs each mode."""
    res = eval_libero.ModeResult()
    for trial in range(args.num_trials):
        eval_libero.run_trial(env, policy, mode, trial, args, res)
    return res


def test_trial_errors_are_counted_not_successes():
    res = run_trials(FakeEnv(), Exploding(), "dense", eval_args())
    s = res.summary()
    assert (s["trials"], s["errors"], s["successes"], s["success_rate"]) == (3, 3, 0, 0.0)
    assert "simulated policy crash" in s["error_messages"][0]
    assert s["outcomes"] == [0, 0, 0]  # an error is a failed trial in the paired tests too


def test_engine_policy_statistics_add_up(trained):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    env = FakeEnv((policy.config.obs_dim - 6, 6))
    ep_policy = eval_libero.EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0)
    res = run_trials(env, ep_policy, "dense", eval_args())
    s = res.summary()
    assert s["successes"] == 3 and s["errors"] == 0 and s["outcomes"] == [1, 1, 1]
    assert s["chunks"] == 3 * 3  # 12 steps at 5 per chunk
    assert s["main_passes_per_chunk"] == 3 and s["acceptance_rate"] is None
    assert "action_noise_max_mean" not in s
    noisy = eval_libero.EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0, action_noise=0.05)
    s = run_trials(env, noisy, "dense", eval_args()).summary()
    assert len(noisy.perturbations) == s["chunks"] == 9
    assert s["action_noise_max_mean"] == pytest.approx(np.mean(noisy.perturbations)) and s["action_noise_max_mean"] > 0


def test_action_noise_perturbs_the_arm_by_sigma_in_normalized_units_from_the_trial_seed(trained, monkeypatch):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    x = np.random.default_rng(0).standard_normal(policy.config.obs_dim).astype(np.float32)
    monkeypatch.setattr(eval_libero, "obs_vector", lambda obs, keys: x)  # one state, step after step
    task = ca.TaskInfo("libero_spatial", 0, "t", policy.config.instructions[0], "", 10)
    sigma, half = 0.05, ((tok.normalizer.high - tok.normalizer.low) / 2).double().numpy()

    decoded = []  # the engine's actions of every chunk, before the perturbation
    act = engine.act

    def recording_act(*a):
        out = act(*a)
        out[0][:, 0] = 1.5  # a decoded action out of range, which the controller clips
        decoded.append(out[0][:5].copy())  # the 5 steps executed of it
        return out
    monkeypatch.setattr(engine, "act", recording_act)

    policies = []

    def executed(noise, trial_seed, chunks):
        decoded.clear()
        ep = eval_libero.EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0, action_noise=noise)
        ep.reset(task, np.random.default_rng(trial_seed))
        policies.append(ep)
        return np.concatenate([ep.act({}) for _ in range(chunks)])

    assert np.array_equal(executed(0.0, 1, 3), np.concatenate(decoded))  # no noise: the decoded actions
    runs = [executed(sigma, seed, 120) for seed in (2, 1, 1)]
    clean = np.concatenate(decoded)
    assert np.array_equal(runs[1], runs[2]) and not np.array_equal(runs[0], runs[2])  # the trial's seed
    dev = (runs[2] - clean) / half
    assert np.all(dev[:, -1] == 0)  # never the gripper
    assert policies[0].perturbations == [] and len(policies[-1].perturbations) == 120
    taken = np.clip(clean[:, :-1], -1, 1)  # the decoded arm actions as the controller takes them
    change = np.abs(runs[2][:, :-1] - taken) / half[:-1]
    assert np.allclose(policies[-1].perturbations, change.reshape(120, 5, -1).max(axis=(1, 2)))
    assert np.all(runs[2][:, 0] == 1) and np.all(change[:, 0] == 0)  # clipping back is no change
    assert np.all(np.abs(runs[2][:, :-1]) <= 1)
    clipped = np.abs(runs[2][:, :-1]) == 1
    dev = dev[50:, :-1][:, ~clipped.any(0)]  # past the AR(1)'s start; dimensions never clipped
    assert dev.shape[1] >= 3 and dev.std() == pytest.approx(sigma, rel=0.2)
    lag1 = np.mean([np.corrcoef(col[:-1], col[1:])[0, 1] for col in dev.T])
    assert lag1 == pytest.approx(eval_libero.NOISE_CORRELATION, abs=0.1)  # smooth over steps
    with pytest.raises(ValueError, match="--action_noise must be a finite number >= 0, got -0.1"):
        eval_libero.main(eval_args(action_noise=-0.1))


@pytest.mark.integration
def test_eval_runs_closed_loop_in_libero(trained, tmp_path):
    """Real LIBERO env, tiny models trained on synthetic demos with libero_spatial task 0's
    instruction and observation sizes: every mode runs on the same init state and reports.
    The module's trained policy (other instructions) must be refused."""
    d, _, _ = trained
    instruction = ca.get_task("libero_spatial", 0).instruction
    demos = synthetic_demo_file(tmp_path / "demos.hdf5", 6, instructions=(instruction,), obs_dims=(39, 70))
    pol = policy_args(d, demos, output=str(tmp_path / "policy.pt"), json=None, epochs=1)
    train_policy.main(pol)
    wrong = eval_args(policy=str(d / "policy.pt"), mode="dense", task_id=[0])
    with pytest.raises(ValueError, match="not trained on the instruction"):
        eval_libero.main(wrong)
    train_draft.main(train_draft.build_parser().parse_args([
        "--policy", str(tmp_path / "policy.pt"), "--output", str(tmp_path / "draft.pt"), "--k", "2",
        "--epochs", "1", "--hidden", "32", "--source", "obs", "--threads", "1"]))
    ev = eval_args(policy=str(tmp_path / "policy.pt"), draft=str(tmp_path / "draft.pt"), mode="all",
                   task_id=[0], num_trials=1, max_steps=15, json=str(tmp_path / "e.json"))
    out = eval_libero.main(ev)
    assert list(out["modes"]) == ["dense", "rsd", "adaptive", "rsd+adaptive"]
    for m, s in out["modes"].items():
        assert s["trials"] == 1 and s["errors"] == 0, s
        assert s["chunks"] == 2  # 15 steps, the whole 10-step chunk executed by default
    assert out["modes"]["dense"]["main_passes_per_chunk"] == 3
    assert out["modes"]["rsd"]["draft_passes_per_chunk"] == 1
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["per_task"]["0"]["rsd"]["trials"] == 1 and saved["config"]["replan_steps"] == 10
    for m, s in saved["per_task"]["0"].items():
        assert s["outcomes"] == [s["successes"]]
    # exact rsd decodes what dense decodes: same trial, same outcome
    assert saved["modes"]["rsd"]["vs_dense"]["only_this_solved"] == 0
    assert saved["modes"]["rsd"]["vs_dense"]["only_reference_solved"] == 0
    expert = eval_libero.main(eval_args(mode="expert", task_id=[0], num_trials=1))
    assert expert["modes"]["expert"]["successes"] == 1


def test_mode_specs_parse_and_set_the_acceptance_rule():
    args = eval_args(acceptance="exact")
    assert eval_libero.parse_modes("dense,rsd@relaxed,rsd+adaptive@sample,expert") == [
        "dense", "rsd@relaxed", "rsd+adaptive@sample", "expert"]
    assert eval_libero.engine_config("rsd@relaxed", args).acceptance == "relaxed"
    assert eval_libero.engine_config("rsd", args).acceptance == "exact"
    assert eval_libero.engine_config("rsd+adaptive@sample", args).mode == "rsd+adaptive"
    # a trailing :K sets the layers the draft proposes in that mode
    assert eval_libero.parse_modes("rsd:3,rsd@relaxed:7") == ["rsd:3", "rsd@relaxed:7"]
    cfg = eval_libero.engine_config("rsd@relaxed:7", args)
    assert (cfg.mode, cfg.acceptance, cfg.k) == ("rsd", "relaxed", 7)
    assert eval_libero.engine_config("rsd+adaptive", args).k is None
    assert eval_libero.base_mode("rsd+adaptive@relaxed:7") == "rsd+adaptive"
    for bad in ("turbo", "rsd@lenient", "dense,dense", "", "expert@exact", "rsd:0", "rsd:x",
                "dense:3", "rsd@exact:", "rsd:3,rsd:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--mode"):
            eval_libero.parse_modes(bad)
    assert eval_libero.mode_list(eval_args(mode="all", parallel_policy=None)) == [
        "dense", "rsd", "adaptive", "rsd+adaptive"]


@pytest.mark.integration
def test_eval_workers_give_the_same_trials_as_one_process():
    """--workers 2 shares two tasks between spawned processes; every trial comes out as in one
    process (same init states and seeds), in task order."""
    runs = [eval_libero.main(eval_args(mode="expert", task_id=[0, 1], num_trials=1, workers=w))
            for w in (1, 2)]
    for out in runs:
        assert list(out["per_task"]) == ["0", "1"] and out["modes"]["expert"]["trials"] == 2
        assert out["modes"]["expert"]["errors"] == 0
    one, two = ({t: (r["expert"]["successes"], r["expert"]["mean_episode_steps"])
                 for t, r in out["per_task"].items()} for out in runs)
    assert one == two


def test_action_history_online_equals_training_rows():
    """The history a rollout feeds the policy at the start of each chunk is the row the
    training set pairs with that step: the last h executed actions, settle action before t=0."""
    from policy_data import ActionHistory, action_history

    acts = np.random.default_rng(0).normal(size=(23, 7)).astype(np.float32)
    rows = action_history(acts, 3)
    assert rows.shape == (23, 21)
    np.testing.assert_array_equal(rows[0], np.tile(ca.SETTLE_ACTION.astype(np.float32), 3))
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


def test_policy_with_action_history_trains_and_runs_in_the_eval_loop(workdir, tmp_path):
    """--action_history 2: the observation grows by 2 x 7, the draft follows, and the eval
    loop appends what it executed (the engine sees the full vector)."""
    d, demos = workdir
    pol = policy_args(d, demos, output=str(tmp_path / "p.pt"), json=None, epochs=2, action_history=2)
    train_policy.main(pol)
    policy, _ = pm.load_policy(str(tmp_path / "p.pt"))
    assert policy.config.action_history == 2 and policy.config.obs_dim == 8 + 6 + 14
    train_draft.main(train_draft.build_parser().parse_args([
        "--policy", str(tmp_path / "p.pt"), "--output", str(tmp_path / "d.pt"), "--k", "2",
        "--epochs", "1", "--hidden", "16", "--source", "obs", "--threads", "1"]))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    engine = RSDEngine(policy, tok)
    seen = []
    act = engine.act
    engine.act = lambda x, *a: (seen.append(x.copy()), act(x, *a))[1]
    ep_policy = eval_libero.EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0)
    ep_policy.reset(FakeEnv().task, np.random.default_rng(0))
    first = ep_policy.act(FakeEnv((8, 6))._obs())
    ep_policy.act(FakeEnv((8, 6))._obs())
    assert [len(x) for x in seen] == [28, 28]
    np.testing.assert_array_equal(seen[0][14:], np.tile(ca.SETTLE_ACTION.astype(np.float32), 2))
    np.testing.assert_allclose(seen[1][14:], first[-2:].reshape(-1), rtol=1e-6)


def test_evaluate_task_runs_the_modes_trial_by_trial(monkeypatch):
    """Trial 0 in every mode, then trial 1, ...: the modes share the machine's load alike.
    Each mode keeps its own policy and result, and trial i starts from init state i."""
    calls = []

    class ClosableEnv(FakeEnv):
        def close(self):
            calls.append("close")

    real_episode = ca.run_episode

    def recorded_episode(env, policy, init_state_id, seed, **kw):
        calls.append((policy.name, init_state_id))
        scenes.append(kw["scene_seed"])
        return real_episode(env, policy, init_state_id, seed, **kw)

    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: ClosableEnv())
    monkeypatch.setattr(eval_libero, "make_policy", lambda m, engine, args: NamedPolicy(m))
    monkeypatch.setattr(ca, "run_episode", recorded_episode)
    scenes = []
    out = eval_libero.evaluate_task(eval_args(num_trials=2), ["dense", "rsd"], 0, engine=None)
    assert calls == [("dense", 0), ("rsd", 0), ("dense", 1), ("rsd", 1), "close"]
    assert all(r.trials == 2 and r.successes == 2 for r in out.values())
    # every mode meets trial i's scene, drawn from the trial's own seed; --reuse_env draws none
    assert scenes == [ca.episode_seed(0, 0, 0)] * 2 + [ca.episode_seed(0, 0, 1)] * 2
    scenes.clear()
    eval_libero.evaluate_task(eval_args(num_trials=2, reuse_env=True), ["dense"], 0, engine=None)
    assert scenes == [None, None]


def test_record_writes_every_trial_from_the_chosen_init_states(monkeypatch, tmp_path):
    """--init_states train starts trial i from init state 20 + i; --record writes every trial's
    episode (failures too) as a demo file that load_episodes reads back."""
    starts = []

    real_episode = ca.run_episode

    def recorded_episode(env, policy, init_state_id, seed, **kw):
        starts.append(init_state_id)
        return real_episode(env, policy, init_state_id, seed, **kw)

    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv())
    monkeypatch.setattr(ca, "run_episode", recorded_episode)
    monkeypatch.setattr(eval_libero, "make_policy", lambda m, engine, args: NamedPolicy(m, 0.1))
    monkeypatch.setattr(eval_libero, "load_engine", lambda args, modes: None)
    out = tmp_path / "rollouts.hdf5"
    args = eval_args(mode="dense,rsd", task_id=[0], num_trials=3, init_states="train",
                     record=str(out), max_steps=8)  # FakeEnv succeeds at 12 steps: all fail
    result = eval_libero.main(args)
    assert starts == [20, 20, 21, 21, 22, 22]
    assert result["modes"]["dense"]["trials"] == 3 and result["modes"]["dense"]["successes"] == 0
    eps = ca.load_episodes(str(out), only_success=False)
    # written task by task, mode by mode: dense trials 0-2, then rsd trials 0-2
    assert [(e.init_state_id, len(e)) for e in eps] == [(20, 8), (21, 8), (22, 8)] * 2
    assert not any(e.success for e in eps) and ca.load_episodes(str(out)) == []
    np.testing.assert_allclose(eps[0].actions, 0.1)
    assert not (tmp_path / "rollouts.hdf5.partial").exists()
    with pytest.raises(ValueError, match="--num_trials 31"):
        eval_libero.main(eval_args(mode="dense", task_id=[0], num_trials=31, init_states="train"))


def rollout_file(path, policy, tok, init_states, n=10):
    """Episodes of the main policy itself (its greedy actions executed in a synthetic state)."""
    rng = np.random.default_rng(5)
    engine = RSDEngine(policy, tok)
    w = ca.DemoWriter(str(path), {"suite": "libero_spatial"})
    for i in range(n):
        obs = rng.normal(size=(24, policy.config.obs_dim)).astype(np.float32)
        actions = np.concatenate([engine.act(o, i % 2, EngineConfig("dense"))[0][:1] for o in obs])
        ep = ca.Episode(actions=actions.astype(np.float32),
                        obs={"robot0_proprio-state": obs[:, :8], "object-state": obs[:, 8:]},
                        success=bool(i % 2), task_suite="libero_spatial", task_id=i % 2,
                        instruction=INSTRUCTIONS[i % 2], init_state_id=init_states[i % len(init_states)],
                        seed=100 + i)
        w.add(ep)
    return w.finish()


def test_draft_distills_on_rollouts_and_refuses_held_out_init_states(trained, tmp_path):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    roll = rollout_file(tmp_path / "roll.hdf5", policy, tok, init_states=[20, 21, 22])
    base = ["--policy", str(d / "policy.pt"), "--k", "2", "--epochs", "6", "--hidden", "64",
            "--threads", "1", "--source", "embedding"]
    result = train_draft.main(train_draft.build_parser().parse_args(
        base + ["--output", str(tmp_path / "draft.pt"), "--rollouts", roll]))
    # failed rollouts count too: 10 episodes x (24 - 10 + 1) chunks, 1 episode held out
    assert result["rollout_chunks"] == {"train": 9 * 15, "val": 15}
    assert len(result["rollout_agreement"]) == 2 and min(result["rollout_agreement"]) > 0.3
    ckpt = torch.load(str(tmp_path / "draft.pt"), weights_only=False)
    assert ckpt["provenance"]["args"]["rollouts"] == [roll]
    bad = rollout_file(tmp_path / "bad.hdf5", policy, tok, init_states=[20, 3])
    with pytest.raises(ValueError, match="bad.hdf5.*held-out init state 3"):
        train_draft.main(train_draft.build_parser().parse_args(
            base + ["--output", str(tmp_path / "draft2.pt"), "--rollouts", bad]))
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


class ConstantExpert(ca.Policy):
    """Stands in for the scripted expert in a takeover: one-step chunks of -0.2."""

    def __init__(self):
        self.taken_over = []

    def reset(self, task, rng):
        pass

    def take_over(self, obs, first_obs):
        self.taken_over.append((float(first_obs["robot0_proprio-state"][0]),
                                float(obs["robot0_proprio-state"][0])))

    def act(self, obs):
        return np.full((1, 7), -0.2)


def test_takeover_records_only_the_experts_part(monkeypatch, tmp_path):
    """--takeover: the policy drives until a drawn step, the expert from there; the recorded
    episode is the expert's part alone, with the step it took over at."""

    experts = []

    def make_expert(name, **kw):
        experts.append(ConstantExpert())
        return experts[-1]

    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv())
    monkeypatch.setattr(ca, "make_policy", make_expert)
    monkeypatch.setattr(ca, "check_policy_supports", lambda name, suite: None)
    monkeypatch.setattr(eval_libero, "EnginePolicy", lambda *a, **k: NamedPolicy("dense", 0.1))
    monkeypatch.setattr(eval_libero, "load_engine", lambda args, modes: None)
    out = tmp_path / "takeover.hdf5"
    args = eval_args(mode="dense", task_id=[0], num_trials=6, init_states="train", record=str(out),
                     takeover=eval_libero.parse_takeover("3:9"), max_steps=30)
    result = eval_libero.main(args)
    # FakeEnv succeeds at step 12 whoever acts: the takeover step decides who finishes.
    summary = result["modes"]["dense"]
    assert summary["successes"] == 6 and summary["takeover"]["taken_over"] == 6
    with h5py.File(out) as f:
        steps = [int(f["data"][k].attrs["takeover_step"]) for k in sorted(f["data"], key=lambda k: int(k[5:]))]
    assert all(3 <= s <= 9 for s in steps) and len(set(steps)) > 1, steps
    eps = ca.load_episodes(str(out))
    assert [len(e) for e in eps] == [12 - s for s in steps]
    for ep, s in zip(eps, steps):
        np.testing.assert_allclose(ep.actions, -0.2)  # none of the policy's 0.1 actions
        np.testing.assert_allclose(ep.obs["robot0_proprio-state"][0, 0], 0.1 * s, rtol=1e-6)
    # the expert saw the episode's first observation and the one it took over in
    seen = [x for e in experts for pair in e.taken_over for x in pair]
    np.testing.assert_allclose(seen, [x for s in steps for x in (0.0, 0.1 * s)], rtol=1e-6)


def test_takeover_needs_a_record_file_and_training_init_states(monkeypatch, tmp_path):
    monkeypatch.setattr(eval_libero, "load_engine", lambda args, modes: None)
    takeover = eval_libero.parse_takeover("5:50")
    assert takeover == (5, 50)
    with pytest.raises(ValueError, match="--record"):
        eval_libero.main(eval_args(mode="dense", task_id=[0], init_states="train", takeover=takeover))
    with pytest.raises(ValueError, match="--init_states train"):
        eval_libero.main(eval_args(mode="dense", task_id=[0], takeover=takeover,
                                   record=str(tmp_path / "x.hdf5")))
    assert not (tmp_path / "x.hdf5").exists() and not (tmp_path / "x.hdf5.partial").exists()
    for bad in ("50:5", "-1:4", "5", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--takeover"):
            eval_libero.parse_takeover(bad)


def test_bench_decoding_compares_every_mode_with_dense_on_recorded_states(trained, tmp_path):
    """With a chained draft (trained here), which the engine feeds its own proposals."""
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    draft = tmp_path / "draft.pt"
    train_draft.main(train_draft.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--output", str(draft), "--k", "2", "--epochs", "3",
        "--hidden", "32", "--threads", "1", "--source", "embedding", "--chained", "--step_hidden", "16"]))
    loaded = pm.load_draft(str(draft))[0]
    assert loaded.config.chained and loaded.steps[0].out_features == 16
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1, 2], n=6)
    out = tmp_path / "bench.json"
    args = bench_decoding.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--draft", str(draft), "--data", roll, "--warmup", "2",
        "--mode", "rsd,rsd@relaxed:1,rsd+adaptive,adaptive", "--tolerance", "0.3",
        "--adaptive_threshold", "1.0", "--json", str(out)])
    result = bench_decoding.main(args)
    modes = result["modes"]
    assert list(modes) == ["dense", "rsd", "rsd@relaxed:1", "rsd+adaptive", "adaptive"]
    # two drafts on the same states in one run: every speculative mode once per draft
    one_pass = tmp_path / "one_pass.pt"
    train_draft.main(train_draft.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--output", str(one_pass), "--k", "2", "--epochs", "1",
        "--hidden", "32", "--threads", "1", "--source", "embedding"]))
    two = bench_decoding.main(bench_decoding.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--draft", str(draft), str(one_pass), "--data", roll,
        "--warmup", "0", "--max_states", "6", "--mode", "rsd,adaptive"]))["modes"]
    assert list(two) == ["dense", "rsd (draft)", "rsd (one_pass)", "adaptive"]
    assert two["rsd (draft)"]["same_codes_as_dense"] == two["rsd (one_pass)"]["same_codes_as_dense"] == 1.0
    with pytest.raises(ValueError, match="different names"):
        bench_decoding.main(bench_decoding.build_parser().parse_args([
            "--policy", str(d / "policy.pt"), "--draft", str(draft), str(draft), "--data", roll]))
    assert modes["rsd@relaxed:1"]["accepted_layers_per_chunk"] <= 1
    # 6 episodes of 24 steps: chunks start at steps 0, 10 and 20; all decoded after the warm-up
    assert result["data"]["states_decoded"] == 6 * 3 - 2 and result["data"]["held_out_init_states_only"]
    assert modes["dense"]["main_passes_per_chunk"] == 3 and modes["dense"]["speedup_vs_dense"] == 1.0
    # exact acceptance decodes what dense decodes, state by state
    assert modes["rsd"]["same_codes_as_dense"] == 1.0 and modes["rsd"]["action_gap_vs_dense_max"] == 0.0
    assert 0 <= modes["rsd"]["acceptance_rate"] <= 1
    assert modes["rsd"]["main_passes_per_chunk"] == pytest.approx(3 - modes["rsd"]["accepted_layers_per_chunk"])
    assert modes["adaptive"]["layers_per_chunk"] <= 3
    assert json.loads(out.read_text())["modes"]["rsd"]["same_codes_as_dense"] == 1.0
    unknown = rollout_file(tmp_path / "other.hdf5", policy, tok, init_states=[0], n=2)
    with h5py.File(unknown, "r+") as f:
        for k in f["data"]:
            f["data"][k].attrs["instruction"] = "open the drawer"
    args.data, args.json = [unknown], None
    with pytest.raises(ValueError, match="other.hdf5.*open the drawer"):
        bench_decoding.main(args)


def test_bench_decoding_with_a_perfect_draft_accepts_every_proposed_layer(trained, tmp_path):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    args = bench_decoding.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--oracle_draft", "--data", roll, "--warmup", "1",
        "--mode", "rsd:1,rsd:2,rsd:3"])
    result = bench_decoding.main(args)
    modes = result["modes"]
    assert result["draft"].startswith("oracle")
    for k in (1, 2, 3):
        m = modes[f"rsd:{k}"]
        assert m["acceptance_rate"] == 1.0 and m["accepted_layers_per_chunk"] == k
        assert m["same_codes_as_dense"] == 1.0
        # the verify pass, then dense passes for the layers after k + 1 (3 layers in all)
        assert m["main_passes_per_chunk"] == 1 + max(0, 3 - k - 1)
    args.draft = ["some_draft.pt"]
    with pytest.raises(ValueError, match="not both"):
        bench_decoding.main(args)
    args.draft, args.mode = None, ["rsd@sample:2"]
    with pytest.raises(ValueError, match="not sample"):
        bench_decoding.main(args)


def test_stop_study_measures_the_engine_rule_fixed_depths_and_the_oracle(trained, tmp_path):
    d, _, _ = trained
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    L = policy.config.num_layers
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1, 2], n=6)
    out = tmp_path / "stop.json"
    args = bench_decoding.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--data", roll, "--warmup", "2", "--stop_study",
        "--stop_thresholds", "0,0.3,1e9", "--oracle_tolerances", "0,0.05,1e9", "--min_layers", "2",
        "--json", str(out)])
    result = bench_decoding.main(args)
    rules = {(r["rule"], r["parameter"]): r for r in result["rules"]}
    assert result["data"]["states_decoded"] == 6 * 3 - 2
    assert [n for rule, n in rules if rule == "fixed"] == list(range(1, L + 1))
    assert rules[("fixed", L)]["gap_max"] == 0.0                  # all layers: the whole code
    assert rules[("fixed", 1)]["gap_mean"] > 0
    for name in ("expected_norm", "oracle"):                      # limits that stop nothing / everything
        assert rules[(name, 0.0)]["layers_mean"] <= L and rules[(name, 1e9)]["layers_mean"] == 2
    assert rules[("oracle", 0.0)]["gap_max"] == 0.0
    assert rules[("oracle", 0.05)]["gap_max"] <= 0.05
    assert json.loads(out.read_text())["rules"] == json.loads(json.dumps(result["rules"]))
    # the study's rule keeps, state by state, the layers the engine's adaptive mode decodes (at a
    # threshold that stops some states early and not others)
    engine = RSDEngine(policy, tok)
    episodes, obs, order, tasks = bench_decoding.recorded_states(args, engine)
    signals = []
    for i, task in zip(order, tasks):
        signal, gap, learned = bench_decoding.layer_signals(engine, obs[i], task)
        assert learned is None
        assert gap[-1] == 0 and gap.shape == signal.shape == (L,)
        signals.append(signal)
    tau = float(np.median([s[1] for s in signals]))
    cfg = EngineConfig(mode="adaptive", adaptive_threshold=tau, min_layers=2)
    depths = []
    for i, task, signal in zip(order, tasks, signals):
        codes, _ = engine.decode_codes(torch.as_tensor(obs[i])[None], torch.tensor([task]), cfg)
        depths.append(codes.shape[-1])
        assert bench_decoding.stop_depths(signal[None], tau, 2)[0] == codes.shape[-1]
    assert 2 in depths and L in depths
    # the engine's oracle stop keeps, on the same states, the layers of the study's oracle rows
    timed = bench_decoding.main(bench_decoding.build_parser().parse_args([
        "--policy", str(d / "policy.pt"), "--data", roll, "--warmup", "2", "--oracle_stop",
        "--mode", "adaptive", "--adaptive_threshold", "0.05", "--min_layers", "2"]))["modes"]["adaptive"]
    assert timed["states"] == result["data"]["states_decoded"]
    assert timed["layers_per_chunk"] == pytest.approx(rules[("oracle", 0.05)]["layers_mean"])
    assert timed["action_gap_vs_dense_max"] <= 0.05 + 1e-6
    args.oracle_stop = True
    with pytest.raises(ValueError, match="--oracle_stop"):
        bench_decoding.main(args)
    args.oracle_stop, args.draft = False, "draft.pt"
    with pytest.raises(ValueError, match="--stop_study.*--draft"):
        bench_decoding.main(args)
    for bad in ("", "a,b", "-1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
            bench_decoding.float_list(bad)


def test_learned_stop_rule_is_trained_and_speculation_keeps_its_depth(trained, tmp_path):
    """train_stop.py fits a stop model on the policy's own rollouts; the engine's adaptive modes
    stop where it predicts a small action gap, and exact speculation keeps the same layers and
    codes as dense decoding with the same rule, state by state."""
    d, _, _ = trained
    policy_path = str(d / "policy.pt")
    policy, _ = pm.load_policy(policy_path)
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    L = policy.config.num_layers
    roll = rollout_file(tmp_path / "roll.hdf5", policy, tok, init_states=[20, 21, 22])
    out, js = tmp_path / "stop.pt", tmp_path / "stop.json"
    base = ["--policy", policy_path, "--epochs", "30", "--hidden", "16", "--threads", "1", "--lr", "1e-2"]
    result = train_stop.main(train_stop.build_parser().parse_args(
        base + ["--rollouts", roll, "--output", str(out), "--json", str(js)]))
    # 10 episodes of 24 steps, chunk starts at 0, 10, 20; 1 episode held out
    assert result["states"] == {"train": 27, "val": 3} and result["episodes"] == {"train": 9, "val": 1}
    # it learns: the validation error of log(gap + eps) is well under its variance
    assert result["val_mse"] < 0.5 * result["val_target_variance"], result
    assert json.loads(js.read_text())["val_mse"] == result["val_mse"]
    stop, ckpt = pm.load_stop(str(out), policy_path)
    assert ckpt["provenance"]["metrics"]["val_mse"] == result["val_mse"]
    with pytest.raises(ValueError, match="different main policy"):
        pm.load_stop(str(out), str(d / "tok.pt"))

    draft = tmp_path / "draft.pt"
    train_draft.main(train_draft.build_parser().parse_args([
        "--policy", policy_path, "--output", str(draft), "--k", "2", "--epochs", "3",
        "--hidden", "32", "--threads", "1", "--source", "embedding"]))
    engine = RSDEngine(policy, tok, pm.load_draft(str(draft), policy_path)[0], stop_model=stop)
    states = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    args = bench_decoding.build_parser().parse_args(["--policy", policy_path, "--data", states, "--warmup", "0"])
    _, obs, order, tasks = bench_decoding.recorded_states(args, engine)
    predicted = np.stack([bench_decoding.layer_signals(engine, obs[i], t)[2] for i, t in zip(order, tasks)])
    eps = stop.config.gap_eps
    tau = math.exp(float(np.median(predicted[:, 1]))) - eps  # stops some states after 2 layers, not others
    depths = []
    for i, task, p in zip(order, tasks, predicted):
        o, t = torch.as_tensor(obs[i])[None], torch.tensor([task])
        kw = dict(adaptive_threshold=tau, min_layers=2, stop_rule="learned")
        dense, _ = engine.decode_codes(o, t, EngineConfig("adaptive", **kw))
        spec, stats = engine.decode_codes(o, t, EngineConfig("rsd+adaptive", **kw))
        assert torch.equal(spec, dense)
        assert stats.accepted <= min(stats.proposed, spec.shape[-1])
        assert bench_decoding.stop_depths(p[None], math.log(tau + eps), 2)[0] == dense.shape[-1]
        depths.append(dense.shape[-1])
        # the expected_norm rule is still the default
        assert EngineConfig("adaptive").stop_rule == "expected_norm"
    assert 2 in depths and L in depths
    # features must come layer after layer
    logits, codes, _ = engine.dense_trace(obs[0], tasks[0])
    with pytest.raises(ValueError, match="layer after layer"):
        LearnedStop(engine).features(1, codes[..., 1])
    # the folded model the engine calls is the model
    trace, direct = LearnedStop(engine), LearnedStop(engine)
    for l in range(L):
        with torch.no_grad():
            expected = float(stop(trace.features(l, codes[..., l]))[0])
        assert direct.predicted_log_gap(l, codes[..., l]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="needs a stop model"):
        RSDEngine(policy, tok).decode_codes(torch.as_tensor(obs[0])[None], torch.tensor([0]),
                                            EngineConfig("adaptive", stop_rule="learned"))
    with pytest.raises(ValueError, match="stop_rule"):
        EngineConfig("adaptive", stop_rule="entropy")
    both = eval_libero.build_parser().parse_args(["--stop_model", str(out), "--oracle_stop"])
    with pytest.raises(ValueError, match="--stop_model.*--oracle_stop, not both"):
        eval_libero.engine_config("adaptive", both)
    bad = rollout_file(tmp_path / "bad.hdf5", policy, tok, init_states=[20, 3])
    with pytest.raises(ValueError, match="bad.hdf5.*held-out init state 3"):
        train_stop.main(train_stop.build_parser().parse_args(base + ["--rollouts", bad, "--output", str(tmp_path / "s2.pt")]))
    assert not (tmp_path / "s2.pt").exists()
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        train_stop.main(train_stop.build_parser().parse_args(base + ["--rollouts", roll, "--epochs", "0"]))


def test_stop_depths_is_the_first_layer_at_or_under_the_limit():
    values = np.array([[0.5, 0.1, 0.3, 0.0], [0.5, 0.4, 0.3, 0.2], [0.0, 0.9, 0.9, 0.9]])
    assert bench_decoding.stop_depths(values, 0.1, 1).tolist() == [2, 4, 1]
    assert bench_decoding.stop_depths(values, 0.1, 3).tolist() == [4, 4, 4]
    assert bench_decoding.stop_depths(values, 0.3, 3).tolist() == [3, 3, 4]


# ---------------------------------------------------------------- statistics of a result

def test_wilson_interval_matches_reference_values():
    lo, hi = eval_libero.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert eval_libero.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    lo, hi = eval_libero.wilson_interval(183, 200)
    assert lo < 0.915 < hi and hi - lo < 0.1
    assert eval_libero.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_comparison_counts_discordant_trials_and_tests_them():
    dense = [1, 1, 1, 1, 1, 0, 0, 1]
    other = [0, 0, 0, 0, 0, 0, 1, 1]
    c = eval_libero.paired_comparison(dense, other)
    assert (c["only_this_solved"], c["only_reference_solved"]) == (1, 5)
    assert c["difference_points"] == pytest.approx(100 * (2 - 6) / 8)
    assert c["mcnemar_p"] == pytest.approx(2 * 7 / 64)  # P(X <= 1 or X >= 5), X ~ Bin(6, 1/2)
    same = eval_libero.paired_comparison(dense, dense)
    assert (same["only_this_solved"], same["only_reference_solved"], same["mcnemar_p"]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same trials"):
        eval_libero.paired_comparison([1, 0], [1])


def saved_result(with_outcomes=True):
    def row(outcomes, latency):
        r = {"successes": sum(outcomes), "trials": len(outcomes), "success_rate": sum(outcomes) / len(outcomes),
             "errors": 0, "latency_ms_median": latency}
        return r | ({"outcomes": outcomes} if with_outcomes else {})

    per_task = {"0": {"dense": row([1, 1, 0, 1], 10.0), "rsd+adaptive": row([1, 0, 1, 1], 5.0)},
                "1": {"dense": row([1, 1, 1, 1], 10.0), "rsd+adaptive": row([0, 1, 1, 1], 5.0)}}
    modes = {m: {k: v for k, v in row([o for t in per_task.values() for o in t[m].get("outcomes", [1])],
                                      per_task["0"][m]["latency_ms_median"]).items() if k != "outcomes"}
             for m in ("dense", "rsd+adaptive")}
    modes["rsd+adaptive"]["speedup_vs_dense"] = 2.0
    return {"modes": modes, "per_task": per_task}


def test_from_json_reports_intervals_paired_tests_and_a_plot(tmp_path, capsys):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(saved_result()))
    out = eval_libero.main(eval_args(from_json=str(path), plot=str(tmp_path / "eval.png"),
                                     json=str(tmp_path / "again.json")))
    vs = out["modes"]["rsd+adaptive"]["vs_dense"]
    assert (vs["trials"], vs["only_this_solved"], vs["only_reference_solved"]) == (8, 1, 2)
    assert "vs_dense" not in out["modes"]["dense"]
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert json.loads((tmp_path / "again.json").read_text())["modes"]["rsd+adaptive"]["vs_dense"] == vs
    table = capsys.readouterr().out
    assert "+1/-2" in table and "95% CI" in table
    # a result saved before per-trial outcomes were recorded: intervals, no paired test
    path.write_text(json.dumps(saved_result(with_outcomes=False)))
    old = eval_libero.main(eval_args(from_json=str(path)))
    assert "vs_dense" not in old["modes"]["rsd+adaptive"]
    assert old["modes"]["rsd+adaptive"]["success_ci95"] == pytest.approx(
        list(eval_libero.wilson_interval(2, 2)))


def test_from_json_refuses_what_it_cannot_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        eval_libero.main(eval_args(from_json=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        eval_libero.main(eval_args(from_json=str(bad)))
    bad.write_text(json.dumps({"modes": {"dense": {"trials": 3}}}))
    with pytest.raises(ValueError, match="not an eval_libero.py result"):
        eval_libero.main(eval_args(from_json=str(bad)))
    unpaired = saved_result()
    unpaired["per_task"]["0"]["rsd+adaptive"]["outcomes"].append(1)
    bad.write_text(json.dumps(unpaired))
    with pytest.raises(ValueError, match="task 0: rsd\\+adaptive has 5 trial outcomes, dense 4"):
        eval_libero.main(eval_args(from_json=str(bad)))


def test_pool_sums_runs_over_seeds_and_tests_all_trials_against_dense(tmp_path, capsys):
    runs = [saved_result(), saved_result(), saved_result()]
    runs[1]["per_task"]["0"]["rsd+adaptive"]["outcomes"] = [0, 0, 1, 1]  # 1 fewer, now dense-only
    runs[1]["per_task"]["0"]["rsd+adaptive"]["successes"] = 2
    runs[1]["modes"]["rsd+adaptive"]["successes"] = 5
    runs[2]["modes"]["expert"] = {"successes": 8, "trials": 8, "success_rate": 1.0}  # not in all runs
    for seed, (r, passes) in enumerate(zip(runs, (2.0, 3.0, 4.0))):
        r["config"] = {"task_suite": "libero_spatial", "task_ids": [0, 1], "num_trials": 4,
                       "init_states": "held_out", "seed": seed, "adaptive_threshold": 0.1, "action_noise": 0.01}
        r["modes"]["dense"] |= {"chunks": 10, "main_passes_per_chunk": 8.0, "layers_per_chunk": 8.0,
                                "accepted_layers_per_chunk": 0.0, "proposed_layers_per_chunk": 0.0}
        r["modes"]["rsd+adaptive"] |= {"chunks": 10 * (seed + 1), "main_passes_per_chunk": passes,
                                       "layers_per_chunk": 4.0, "accepted_layers_per_chunk": 1.0,
                                       "proposed_layers_per_chunk": 3.0, "action_noise_max_mean": 0.1 * (seed + 1)}
    paths = []
    for i, r in enumerate(runs):
        paths.append(str(tmp_path / f"s{i}.json"))
        (tmp_path / f"s{i}.json").write_text(json.dumps(r))
    out = eval_libero.main(eval_args(pool=paths, json=str(tmp_path / "pool.json")))
    assert list(out["modes"]) == ["dense", "rsd+adaptive"] and out["seeds"] == [0, 1, 2]
    d, r = out["modes"]["dense"], out["modes"]["rsd+adaptive"]
    assert (d["successes"], d["trials"], r["successes"], r["trials"]) == (21, 24, 17, 24)
    # each run: task 0 trial 1 dense-only, trial 2 rsd-only, task 1 trial 0 dense-only; run 1 one more
    assert (r["vs_dense"]["only_this_solved"], r["vs_dense"]["only_reference_solved"]) == (3, 7)
    assert r["vs_dense"]["trials"] == 24 and r["speedup_vs_dense_per_run"] == [2.0, 2.0, 2.0]
    assert r["main_passes_per_chunk"] == pytest.approx((2 * 10 + 3 * 20 + 4 * 30) / 60)
    assert r["acceptance_rate"] == pytest.approx(1 / 3)
    assert r["action_noise_max_mean"] == pytest.approx((0.1 * 10 + 0.2 * 20 + 0.3 * 30) / 60)  # over all chunks
    assert "action_noise_max_mean" not in d and out["config"]["action_noise"] == 0.01  # the runs' settings
    assert json.loads((tmp_path / "pool.json").read_text())["modes"]["rsd+adaptive"]["vs_dense"] == r["vs_dense"]
    printed = capsys.readouterr().out
    assert "3 runs pooled, seeds 0, 1, 2" in printed and "--action_noise 0.01" in printed
    # two pooled results pair trial by trial when they pool the same seeds in the same order
    again = str(tmp_path / "again.json")
    eval_libero.main(eval_args(pool=paths, json=again))
    assert eval_libero.main(eval_args(compare=[str(tmp_path / "pool.json"), again]))["dense"]["same_outcome"] == 24
    eval_libero.main(eval_args(pool=[paths[1], paths[0], paths[2]], json=again))
    with pytest.raises(ValueError, match="pool different trials \\(seeds \\[0, 1, 2\\] against \\[1, 0, 2\\]"):
        eval_libero.main(eval_args(compare=[str(tmp_path / "pool.json"), again]))
    # what cannot be pooled is refused, naming why
    runs[1]["config"]["oracle_stop"] = False  # saved after the flag existed; the others before
    (tmp_path / "s1.json").write_text(json.dumps(runs[1]))
    assert eval_libero.main(eval_args(pool=paths))["modes"]["dense"]["trials"] == 24
    runs[2]["config"]["seed"] = 0
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="s0.json and .*s2.json both ran seed 0"):
        eval_libero.main(eval_args(pool=paths))
    runs[2]["config"] |= {"seed": 2, "adaptive_threshold": 0.07}
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="differ in adaptive_threshold \\(0.1 against 0.07\\)"):
        eval_libero.main(eval_args(pool=paths))
    runs[2]["config"] |= {"adaptive_threshold": 0.1, "action_noise": 0.0}
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="differ in action_noise \\(0.01 against 0.0\\)"):
        eval_libero.main(eval_args(pool=paths))
    with pytest.raises(ValueError, match="two or more"):
        eval_libero.main(eval_args(pool=paths[:1]))
    for other in (dict(from_json=paths[0]), dict(compare=paths[:2])):
        with pytest.raises(ValueError, match="one of --compare, --from_json and --pool"):
            eval_libero.main(eval_args(pool=paths, **other))


def test_compare_pairs_two_runs_trial_by_trial(tmp_path, capsys):
    first, second = saved_result(), saved_result()
    second["per_task"]["1"]["dense"]["outcomes"] = [1, 0, 1, 1]      # trial 1 of task 1 now fails
    second["per_task"]["0"]["rsd+adaptive"]["outcomes"] = [1, 1, 1, 1]  # trial 1 of task 0 now solved
    second["modes"]["expert"] = {"successes": 8, "trials": 8, "success_rate": 1.0}  # only in one run
    for r in (first, second):
        r["config"] = {"task_suite": "libero_spatial", "task_ids": [0, 1], "num_trials": 4,
                       "init_states": "held_out", "seed": 0, "adaptive_threshold": 0.1}
    second["config"]["adaptive_threshold"] = 0.07  # another setting of the same trials
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    out = eval_libero.main(eval_args(compare=[str(a), str(b)], json=str(tmp_path / "cmp.json")))
    assert set(out) == {"dense", "rsd+adaptive"}
    d, r = out["dense"], out["rsd+adaptive"]
    assert (d["first_successes"], d["second_successes"], d["same_outcome"]) == (7, 6, 7)
    assert (d["only_second_solved"], d["only_first_solved"]) == (0, 1)
    assert (r["first_successes"], r["second_successes"], r["same_outcome"]) == (6, 7, 7)
    assert (r["only_second_solved"], r["only_first_solved"], r["mcnemar_p"]) == (1, 0, 1.0)
    assert json.loads((tmp_path / "cmp.json").read_text())["modes"] == out
    assert "only second solved" in capsys.readouterr().out
    # what cannot be paired is refused, naming why
    second["config"]["seed"] = 1
    b.write_text(json.dumps(second))
    with pytest.raises(ValueError, match="different trials \\(seed 0 against 1\\)"):
        eval_libero.main(eval_args(compare=[str(a), str(b)]))
    second["config"]["seed"] = 0
    del second["per_task"]["1"]["dense"]["outcomes"]
    b.write_text(json.dumps(second))
    with pytest.raises(ValueError, match="no per-trial outcomes for dense in task 1"):
        eval_libero.main(eval_args(compare=[str(a), str(b)]))
    with pytest.raises(FileNotFoundError, match="--compare: no such file"):
        eval_libero.main(eval_args(compare=[str(a), str(tmp_path / "missing.json")]))
    only_expert = {"modes": {"expert": second["modes"]["expert"]}, "per_task": {}}
    b.write_text(json.dumps(only_expert))
    with pytest.raises(ValueError, match="no mode in common"):
        eval_libero.main(eval_args(compare=[str(a), str(b)]))
    # --compare_modes pairs two modes by name, here two of one run: its paired test against dense
    one = eval_libero.main(eval_args(compare=[str(a), str(a)], compare_modes=["dense", "rsd+adaptive"]))
    assert list(one) == ["dense / rsd+adaptive"]
    c, vs = one["dense / rsd+adaptive"], eval_libero.main(eval_args(from_json=str(a)))["modes"]["rsd+adaptive"]["vs_dense"]
    assert (c["first_successes"], c["second_successes"], c["same_outcome"]) == (7, 6, 5)
    assert (c["only_second_solved"], c["only_first_solved"]) == (vs["only_this_solved"], vs["only_reference_solved"]) == (1, 2)
    with pytest.raises(ValueError, match=re.escape(f"--compare_modes: {b} has no mode 'rsd+adaptive' (it has expert)")):
        eval_libero.main(eval_args(compare=[str(a), str(b)], compare_modes=["dense", "rsd+adaptive"]))
    with pytest.raises(ValueError, match="--compare_modes needs --compare"):
        eval_libero.main(eval_args(from_json=str(a), compare_modes=["dense", "rsd+adaptive"]))
