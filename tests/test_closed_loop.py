"""The closed loop: eval_libero.py (modes, trials, EnginePolicy statistics, action noise) and
collect_actions.py's token-policy rollouts and DAgger takeovers, mostly without a simulator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import h5py
import numpy as np
import pytest

import collect_actions as ca
import demos
import eval_libero
import policy_models as pm
import rsd_engine_core
import train_draft
import train_policy
from policy_fixtures import (INSTRUCTIONS, FakeEnv, draft, draft_args, policy_args,  # noqa: F401
                             synthetic_demo_file, trained, workdir)
from results import ModeResult
from rsd_engine_core import EngineConfig, EnginePolicy, RSDEngine
from rvq_tokenizer import load_tokenizer


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


def eval_args(**over) -> eval_libero.EvalArgs:
    """eval_libero's settings (3 trials); ``over`` replaces fields (checked again)."""
    args = eval_libero.build_parser().parse_args(["--num_trials", "3"])
    return dataclasses.replace(args, **over)


def run_trials(env, policy, mode, args):
    """Trials 0..num_trials-1 of one task with one policy, as Evaluator.task runs each mode."""
    res = ModeResult()
    for trial in range(args.num_trials):
        eval_libero.run_trial(env, policy, mode, trial, args, res)
    return res


def engine_of(d, **kw):
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    return RSDEngine(policy, tok, **kw)


# ---------------------------------------------------------------- trials


def test_trial_errors_are_counted_not_successes():
    res = run_trials(FakeEnv(), Exploding(), "dense", eval_args())
    s = res.summary()
    assert (s["trials"], s["errors"], s["successes"], s["success_rate"]) == (3, 3, 0, 0.0)
    assert "simulated policy crash" in s["error_messages"][0]
    assert s["outcomes"] == [0, 0, 0]  # an error is a failed trial in the paired tests too


def test_engine_policy_statistics_add_up(trained):
    d, _, _ = trained
    engine = engine_of(d)
    env = FakeEnv((engine.policy.config.obs_dim - 6, 6))
    ep_policy = EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0)
    res = run_trials(env, ep_policy, "dense", eval_args())
    s = res.summary()
    assert s["successes"] == 3 and s["errors"] == 0 and s["outcomes"] == [1, 1, 1]
    assert s["chunks"] == 3 * 3  # 12 steps at 5 per chunk
    assert s["main_passes_per_chunk"] == 3 and s["acceptance_rate"] is None
    assert "action_noise_max_mean" not in s
    noisy = EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0, action_noise=0.05)
    s = run_trials(env, noisy, "dense", eval_args()).summary()
    assert len(noisy.perturbations) == s["chunks"] == 9
    assert s["action_noise_max_mean"] == pytest.approx(np.mean(noisy.perturbations)) and s["action_noise_max_mean"] > 0


def test_action_noise_perturbs_the_arm_by_sigma_in_normalized_units_from_the_trial_seed(trained, monkeypatch):
    d, _, _ = trained
    engine = engine_of(d)
    policy, tok = engine.policy, engine.tokenizer
    x = np.random.default_rng(0).standard_normal(policy.config.obs_dim).astype(np.float32)
    monkeypatch.setattr(rsd_engine_core, "obs_vector", lambda obs, keys, widths=(): x)  # one state, step after step
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
        ep = EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, seed=0, action_noise=noise)
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
    assert lag1 == pytest.approx(rsd_engine_core.NOISE_CORRELATION, abs=0.1)  # smooth over steps
    assert eval_libero.EnginePolicy is EnginePolicy  # the policy eval_libero runs
    message = "--action_noise must be a finite number >= 0, got -0.1"
    with pytest.raises(ValueError, match=message):
        eval_args(action_noise=-0.1)
    with pytest.raises(ValueError, match=message):
        eval_libero.build_parser().parse_args(["--action_noise", "-0.1"])
    with pytest.raises(ValueError, match=message):
        EnginePolicy(engine, EngineConfig("dense"), replan_steps=5, action_noise=-0.1)
    with pytest.raises(ValueError, match="--action_noise must be a finite number >= 0, got nan"):
        rsd_engine_core.check_action_noise(float("nan"))


def test_evaluator_runs_the_modes_trial_by_trial(monkeypatch):
    """Trial 0 in every mode, then trial 1, ...: the modes share the machine's load alike.
    Each mode keeps its own policy and result, and trial i starts from held-out init state i."""
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
    monkeypatch.setattr(eval_libero, "load_engine", lambda args: None)
    monkeypatch.setattr(ca, "run_episode", recorded_episode)
    scenes = []
    out = eval_libero.Evaluator(eval_args(num_trials=2, mode="dense,rsd")).task(0)
    assert calls == [("dense", 0), ("rsd", 0), ("dense", 1), ("rsd", 1), "close"]
    assert list(out) == ["dense", "rsd"]
    assert all(r.trials == 2 and r.successes == 2 for r in out.values())
    # every mode meets trial i's scene, drawn from the trial's own seed; --reuse_env draws none
    assert scenes == [ca.episode_seed(0, 0, 0)] * 2 + [ca.episode_seed(0, 0, 1)] * 2
    scenes.clear()
    eval_libero.Evaluator(eval_args(num_trials=2, mode="dense", reuse_env=True)).task(0)
    assert scenes == [None, None]


def test_trials_start_from_held_out_init_states_only(capsys):
    """Trial i starts from held-out init state i (0-19): a 21st trial would start from a
    training init state, so --num_trials is at most 20; --init_states is gone (recording
    rollouts from training init states is collect_actions.py --policy token)."""
    assert eval_args(num_trials=20).num_trials == 20
    for n in (21, 0):
        with pytest.raises(ValueError, match=rf"--num_trials must be in 1\.\.20: .*got {n}"):
            eval_args(num_trials=n)
    with pytest.raises(ValueError, match="--num_trials must be in 1..20"):
        eval_libero.build_parser().parse_args(["--num_trials", "21"])
    for flag in ("--init_states", "--record", "--takeover", "--from_json", "--compare", "--compare_modes",
                 "--pool"):
        with pytest.raises(SystemExit):
            eval_libero.build_parser().parse_args([flag, "x"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_evaluate_returns_the_result_of_every_mode_on_every_task(trained, draft, monkeypatch):
    """eval_libero.evaluate without a simulator: the engine's modes on two tasks' trials, the
    result the table, the JSON and report_libero.py read."""
    d, _, _ = trained
    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv((8, 6)))
    monkeypatch.setattr(ca, "get_task", lambda suite, t: ca.TaskInfo(suite, t, "t", INSTRUCTIONS[t % 2], "", 40))
    args = eval_args(policy=str(d / "policy.pt"), draft=str(draft), mode="dense,rsd,rsd:1,tree:2/2", task_id="0,1",
                     num_trials=2)
    out = eval_libero.evaluate(args)
    assert list(out["modes"]) == ["dense", "rsd", "rsd:1", "tree:2/2"] and list(out["per_task"]) == ["0", "1"]
    for m, s in out["modes"].items():
        assert (s["trials"], s["successes"], s["errors"]) == (4, 4, 0), s
        assert s["chunks"] == 4 * 2  # 12 steps, the whole 10-step chunk executed by default
    assert out["modes"]["dense"]["main_passes_per_chunk"] == 3
    assert out["modes"]["rsd:1"]["proposed_layers_per_chunk"] == 1
    assert out["modes"]["tree:2/2"]["proposed_layers_per_chunk"] == 2
    assert out["per_task"]["1"]["tree:2/2"]["outcomes"] == out["per_task"]["1"]["dense"]["outcomes"]
    assert out["modes"]["rsd"]["vs_dense"]["trials"] == 4
    assert out["per_task"]["1"]["rsd"]["outcomes"] == [1, 1]
    cfg = out["config"]
    assert cfg["init_states"] == "held_out" and cfg["task_ids"] == [0, 1] and cfg["replan_steps"] == 10
    assert cfg["modes"] == ["dense", "rsd", "rsd:1", "tree:2/2"]
    json.dumps(out)  # what --json writes


# ---------------------------------------------------------------- modes and the engine


def test_mode_specs_parse_and_set_the_acceptance_rule():
    args = eval_args(acceptance="exact")
    assert eval_libero.mode_list("dense,rsd@relaxed,rsd+adaptive@sample,expert") == [
        "dense", "rsd@relaxed", "rsd+adaptive@sample", "expert"]
    assert eval_args(mode="dense,rsd@relaxed,expert").mode == ["dense", "rsd@relaxed", "expert"]
    assert eval_args(mode="dense,rsd@relaxed,expert").policy_modes == ["dense", "rsd@relaxed"]
    assert args.engine_config("rsd@relaxed").acceptance == "relaxed"
    assert args.engine_config("rsd").acceptance == "exact"
    assert args.engine_config("rsd+adaptive@sample").mode == "rsd+adaptive"
    # a trailing :K sets the layers the draft proposes in that mode
    assert rsd_engine_core.parse_modes("rsd:3,rsd@relaxed:7") == ["rsd:3", "rsd@relaxed:7"]
    assert rsd_engine_core.split_spec("rsd@relaxed:7") == ("rsd", "relaxed", 7, None)
    cfg = args.engine_config("rsd@relaxed:7")
    assert (cfg.mode, cfg.acceptance, cfg.k) == ("rsd", "relaxed", 7)
    assert args.engine_config("rsd+adaptive").k is None
    assert eval_args(k=2).engine_config("rsd+adaptive").k == 2
    assert rsd_engine_core.base_mode("rsd+adaptive@relaxed:7") == "rsd+adaptive"
    for bad in ("turbo", "rsd@lenient", "dense,dense", "", "expert@exact", "rsd:0", "rsd:x",
                "dense:3", "rsd@exact:", "rsd:3,rsd:3"):
        with pytest.raises(ValueError, match="--mode"):
            rsd_engine_core.parse_modes(bad, ("expert",))
        with pytest.raises(argparse.ArgumentTypeError, match="--mode"):
            eval_libero.mode_list(bad)
        # EvalArgs built in code: its mode check raises mode_list's ArgumentTypeError
        with pytest.raises((ValueError, argparse.ArgumentTypeError), match="--mode"):
            eval_args(mode=bad)
    with pytest.raises(ValueError, match="--mode"):  # the expert is eval_libero's alone
        rsd_engine_core.parse_modes("dense,expert")
    assert eval_args(mode="all", parallel_policy=None).mode == ["dense", "rsd", "adaptive", "rsd+adaptive", "tree", "tree+adaptive"]
    assert eval_args(mode="all", parallel_policy="par.pt").mode == [m for m in rsd_engine_core.MODES
                                                                     if m not in rsd_engine_core.HEADS_MODES]
    # the heads modes only with their heads
    assert eval_args(mode="all", parallel_policy="par.pt", heads="heads.pt").mode == list(rsd_engine_core.MODES)
    assert eval_args(mode="all", heads="heads.pt").mode == ["dense", "rsd", "adaptive", "rsd+adaptive", "tree",
                                                            "tree+adaptive", "heads", "heads+adaptive", "rsd+heads",
                                                            "rsd+heads+adaptive"]
    assert eval_args(mode="all,expert").mode == ["dense", "rsd", "adaptive", "rsd+adaptive", "tree", "tree+adaptive", "expert"]
    assert eval_args(mode="rsd:2,all").mode == ["rsd:2", "dense", "rsd", "adaptive", "rsd+adaptive", "tree", "tree+adaptive"]


def test_load_engine_refuses_what_the_models_cannot_run(trained, draft, tmp_path, monkeypatch):
    """Every mode is checked against the engine before the first trial: a draft asked for more
    layers than it proposes (naming the mode), a missing model, a draft of another policy."""
    d, path, _ = trained
    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: pytest.fail("no env before the checks"))
    models = dict(policy=str(d / "policy.pt"), draft=str(draft), task_id=[0])
    engine = eval_libero.load_engine(eval_args(mode="dense,rsd:3,rsd+adaptive:2", **models))
    assert engine.draft.config.num_layers == 3 and engine.policy.config.num_layers == 3
    assert eval_libero.load_engine(eval_args(mode="expert")) is None  # the expert needs no model
    for mode, k in (("dense,rsd:99", 99), ("rsd@relaxed:4", 4)):
        spec = mode.split(",")[-1]
        with pytest.raises(ValueError, match=re.escape(f"--mode {spec}: k = {k}, but the draft proposes at most 3")):
            eval_libero.load_engine(eval_args(mode=mode, **models))
        with pytest.raises(ValueError, match=re.escape(f"--mode {spec}: k = {k}")):
            eval_libero.main(eval_args(mode=mode, **models))
    with pytest.raises(ValueError, match=re.escape("--mode rsd+adaptive: k = 5")):
        eval_libero.load_engine(eval_args(mode="rsd+adaptive", k=5, **models))
    with pytest.raises(ValueError, match=re.escape("--mode rsd:99: k = 99")):
        engine.check_config(eval_args().engine_config("rsd:99"), "rsd:99")
    with pytest.raises(ValueError, match=re.escape("--mode rsd needs a draft (--draft)")):
        eval_libero.load_engine(eval_args(mode="dense,rsd", policy=str(d / "policy.pt")))
    with pytest.raises(ValueError, match=re.escape("--mode dense,rsd needs --policy")):
        eval_libero.load_engine(eval_args(mode="dense,rsd,expert"))
    with pytest.raises(ValueError, match=re.escape("--mode parallel needs --parallel_policy")):
        engine.check_config(EngineConfig("parallel"), "parallel")
    with pytest.raises(ValueError, match="--min_layers 4 exceeds the policy's 3 layers"):
        eval_libero.load_engine(eval_args(mode="adaptive", min_layers=4, **models))
    # a draft distilled from another policy (here one retrained with another seed) is refused
    train_policy.main(policy_args(d, path, output=str(tmp_path / "other.pt"), json=None, epochs=1, seed=1))
    with pytest.raises(ValueError, match="different main policy"):
        eval_libero.load_engine(eval_args(mode="dense,rsd", policy=str(tmp_path / "other.pt"), draft=str(draft)))
    with pytest.raises(ValueError, match="different main policy"):
        rsd_engine_core.build_engine(str(tmp_path / "other.pt"), draft=str(draft))


def test_stop_rule_flags_are_checked():
    both = ["--stop_model", "stop.pt", "--oracle_stop"]
    with pytest.raises(ValueError, match="--stop_model.*--oracle_stop, not both"):
        eval_libero.build_parser().parse_args(both)
    assert rsd_engine_core.stop_rule_of(None, False) == "expected_norm"
    assert rsd_engine_core.stop_rule_of("stop.pt", False) == "learned"
    assert rsd_engine_core.stop_rule_of(None, True) == "oracle"
    assert eval_args(stop_model="stop.pt").engine_config("adaptive").stop_rule == "learned"
    assert eval_args(oracle_stop=True).engine_config("rsd+adaptive").stop_rule == "oracle"
    assert eval_args().engine_config("adaptive").stop_rule == "expected_norm"


# ---------------------------------------------------------------- collect_actions: token-policy rollouts


def test_token_rollouts_are_recorded_from_the_chosen_init_states(trained, monkeypatch, tmp_path):
    """collect_actions.py --policy token --init_states train starts episode i from training init
    state 20 + i and writes every episode (failures too) as a demo file that load_episodes
    reads back."""
    d, _, _ = trained
    checkpoint = str(d / "policy.pt")
    starts = []
    real_episode = ca.run_episode

    def recorded_episode(env, policy, init_state_id, seed, **kw):
        starts.append(init_state_id)
        return real_episode(env, policy, init_state_id, seed, **kw)

    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv())
    monkeypatch.setattr(ca, "run_episode", recorded_episode)
    monkeypatch.setattr(ca, "make_policy", lambda spec: NamedPolicy(spec.name, 0.1))
    out = tmp_path / "rollouts.hdf5"
    args = ca.build_parser().parse_args([
        "--policy", "token", "--checkpoint", checkpoint, "--task_id", "0", "--num_episodes", "3",
        "--init_states", "train", "--output", str(out), "--max_steps", "8", "--no_progress"])
    summary = ca.collect(args)  # FakeEnv succeeds at 12 steps: all fail
    assert starts == [20, 21, 22]
    assert (summary["episodes"], summary["successes"], summary["recorded"]) == (3, 0, 3)
    assert "takeover" not in summary
    eps = demos.load_episodes(str(out), only_success=False)
    assert [(e.init_state_id, len(e)) for e in eps] == [(20, 8), (21, 8), (22, 8)]
    assert not any(e.success for e in eps) and demos.load_episodes(str(out)) == []
    np.testing.assert_allclose(eps[0].actions, 0.1)
    assert not (tmp_path / "rollouts.hdf5.partial").exists()
    with h5py.File(out) as f:
        assert f["data"].attrs["policy"] == "token" and f["data"].attrs["checkpoint"] == checkpoint
        assert all(f["data"][k].attrs["policy"] == "token" for k in f["data"])


def test_token_policy_rolls_out_the_checkpoints_dense_greedy_actions(trained, monkeypatch, tmp_path):
    """--policy token builds the checkpoint's engine and decodes densely, a whole chunk per call;
    --init_states held_out records the states bench_decoding.py decodes."""
    d, _, _ = trained
    checkpoint = str(d / "policy.pt")
    policy = ca.make_policy(ca.PolicySpec("token", checkpoint=checkpoint))
    assert isinstance(policy, EnginePolicy) and policy.cfg.mode == "dense" and policy.replan_steps == 10
    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv((8, 6)))
    out = tmp_path / "held_out.hdf5"
    summary = ca.collect(ca.CollectArgs(policy="token", checkpoint=checkpoint, task_id=[0], num_episodes=2,
                                        init_states="held_out", max_steps=8, output=str(out), no_progress=True))
    assert summary["episodes"] == summary["recorded"] == 2
    eps = demos.load_episodes(str(out), only_success=False)
    assert [e.init_state_id for e in eps] == [0, 1]
    engine = engine_of(d)
    first = np.concatenate([FakeEnv((8, 6))._obs()[k] for k in engine.policy.config.obs_keys])
    expected = engine.act(first, 0, EngineConfig("dense"))[0][:8]
    for ep in eps:  # the FakeEnv's states do not depend on the actions: every episode alike
        np.testing.assert_allclose(ep.actions, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="--checkpoint None: no such file"):
        ca.CollectArgs(policy="token")
    with pytest.raises(ValueError, match="--checkpoint is for --policy token"):
        ca.CollectArgs(checkpoint=checkpoint)


# ---------------------------------------------------------------- collect_actions: DAgger takeovers


class ConstantExpert(ca.Policy):
    """Stands in for the scripted expert in a takeover: one-step chunks of -0.2."""

    def __init__(self, noise=1.0):
        self.noise = noise
        self.taken_over = []

    def reset(self, task, rng):
        pass

    def take_over(self, obs, first_obs):
        self.taken_over.append((float(first_obs["robot0_proprio-state"][0]),
                                float(obs["robot0_proprio-state"][0])))

    def act(self, obs):
        return np.full((1, 7), -0.2)


@pytest.fixture
def constant_experts(monkeypatch):
    """The scripted experts collect_actions builds, as ConstantExperts (listed as built)."""
    import scripted_tasks

    experts = []

    def make_expert(noise=1.0):
        experts.append(ConstantExpert(noise))
        return experts[-1]

    monkeypatch.setattr(scripted_tasks, "SuiteExpert", make_expert)
    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv((8, 6)))
    return experts


def test_takeover_records_only_the_experts_part(trained, constant_experts, tmp_path):
    """--takeover: the token policy drives until a drawn step, the expert from there; the
    recorded episode is the expert's part alone, with the step it took over at."""
    d, _, _ = trained
    checkpoint = str(d / "policy.pt")
    out = tmp_path / "takeover.hdf5"
    args = ca.build_parser().parse_args([
        "--policy", "token", "--checkpoint", checkpoint, "--takeover", "3:9", "--noise", "0.5",
        "--task_id", "0", "--num_episodes", "6", "--max_steps", "30", "--output", str(out), "--no_progress"])
    assert args.takeover == (3, 9) and args.init_states == "train"
    summary = ca.collect(args)
    # FakeEnv succeeds at step 12 whoever acts: the takeover step decides who finishes.
    assert summary["successes"] == 6 and summary["takeover"]["taken_over"] == 6
    assert summary["takeover"]["solved_before_takeover"] == 0 and summary["recorded"] == 6
    with h5py.File(out) as f:
        keys = sorted(f["data"], key=lambda k: int(k[5:]))
        steps = [int(f["data"][k].attrs["takeover_step"]) for k in keys]
        assert all(f["data"][k].attrs["policy"] == "scripted" for k in keys)
        assert all(f["data"][k].attrs["takeover_from"] == checkpoint for k in keys)
        assert list(f["data"].attrs["takeover"]) == [3, 9]
    assert all(3 <= s <= 9 for s in steps) and len(set(steps)) > 1, steps
    assert summary["takeover"]["mean_takeover_step"] == pytest.approx(np.mean(steps))
    eps = demos.load_episodes(str(out))
    assert [e.init_state_id for e in eps] == [20, 21, 22, 23, 24, 25]
    assert [len(e) for e in eps] == [12 - s for s in steps]
    for ep, s in zip(eps, steps):
        np.testing.assert_allclose(ep.actions, -0.2)  # none of the token policy's actions
        np.testing.assert_allclose(ep.obs["robot0_proprio-state"][0, 0], 0.1 * s, rtol=1e-6)
    # the expert (one per rollout policy, with --noise) saw the episode's first observation and
    # the one it took over in
    assert len(constant_experts) == 1 and constant_experts[0].noise == 0.5
    seen = [x for e in constant_experts for pair in e.taken_over for x in pair]
    np.testing.assert_allclose(seen, [x for s in steps for x in (0.0, 0.1 * s)], rtol=1e-6)


def test_takeover_after_the_episode_ended_records_nothing(trained, constant_experts, tmp_path):
    """Runner.run: (episode, attrs) of the expert's part, or (episode, None) when the episode
    ended before the expert's turn."""
    d, _, _ = trained
    checkpoint = str(d / "policy.pt")
    jobs = ca.make_jobs("libero_spatial", [0], 2, 0, "train")
    late = ca.Runner(ca.PolicySpec("token", checkpoint=checkpoint, takeover=(15, 20)), False, 30)
    assert isinstance(late.policy, ca.TakeoverPolicy)
    ep, attrs = late.run(jobs[0])
    assert attrs is None and ep.success and len(ep) == 12 and late.policy.takeover_step is None
    early = ca.Runner(ca.PolicySpec("token", checkpoint=checkpoint, takeover=(4, 4)), False, 30)
    ep, attrs = early.run(jobs[1])
    assert attrs == {"episode_index": 1, "policy": "scripted", "takeover_step": 4, "takeover_from": checkpoint}
    assert len(ep) == 12 - 4 and ep.init_state_id == 21
    np.testing.assert_allclose(ep.actions, -0.2)
    summary = ca.collect(ca.CollectArgs(policy="token", checkpoint=checkpoint, takeover=(15, 20), task_id=[0],
                                        num_episodes=3, max_steps=30, output=str(tmp_path / "t.hdf5"),
                                        no_progress=True))
    assert summary["takeover"] == {"taken_over": 0, "solved_before_takeover": 3, "mean_takeover_step": None}
    assert summary["successes"] == 3 and summary["recorded"] == 0


def test_perturbing_a_token_policy_is_refused(trained, tmp_path):
    """--perturb is for expert demos: the token policy keeps the history of the actions it decoded,
    which a perturbation outside it would falsify (with or without --takeover)."""
    d, _, _ = trained
    for takeover in (None, (3, 9)):
        with pytest.raises(ValueError, match=r"--perturb .* not a token policy"):
            ca.CollectArgs(policy="token", checkpoint=str(d / "policy.pt"), takeover=takeover, perturb=0.1,
                           task_id=[0], num_episodes=2, max_steps=30, output=str(tmp_path / "t.hdf5"))


def test_takeover_needs_a_token_policy_and_training_init_states(trained, tmp_path):
    d, _, _ = trained
    checkpoint = str(d / "policy.pt")
    x = str(tmp_path / "x.hdf5")
    assert ca.parse_takeover("5:50") == (5, 50)
    args = ca.build_parser().parse_args(["--policy", "token", "--checkpoint", checkpoint, "--takeover", "5:50",
                                         "--output", x])
    assert args.takeover == (5, 50) and args.spec.takeover == (5, 50)
    policy = ca.make_policy(args.spec)
    assert isinstance(policy, ca.TakeoverPolicy) and (policy.first, policy.last) == (5, 50)
    assert isinstance(policy.learner, EnginePolicy) and policy.learner.cfg.mode == "dense"
    for other in ("scripted", "openpi"):
        with pytest.raises(ValueError, match="--takeover .*--policy token"):
            ca.CollectArgs(policy=other, takeover=(5, 50), output=x)
    with pytest.raises(ValueError, match="--takeover .*--policy token"):
        ca.build_parser().parse_args(["--takeover", "5:50", "--output", x])
    for init_states in ("held_out", "all", [20, 21]):
        with pytest.raises(ValueError, match="--takeover .*--init_states train"):
            ca.CollectArgs(policy="token", checkpoint=checkpoint, takeover=(5, 50), init_states=init_states,
                           output=x)
    with pytest.raises(ValueError, match="--takeover .*--init_states train"):
        ca.build_parser().parse_args(["--policy", "token", "--checkpoint", checkpoint, "--takeover", "5:50",
                                      "--init_states", "held_out", "--output", x])
    assert not (tmp_path / "x.hdf5").exists() and not (tmp_path / "x.hdf5.partial").exists()
    for bad in ("50:5", "-1:4", "5", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--takeover"):
            ca.parse_takeover(bad)


# ---------------------------------------------------------------- in LIBERO


@pytest.mark.integration
def test_eval_runs_closed_loop_in_libero(trained, tmp_path):
    """Real LIBERO env, tiny models trained on synthetic demos with libero_spatial task 0's
    instruction and observation sizes: every mode runs on the same init state and reports.
    The module's trained policy (other instructions) must be refused."""
    d, _, _ = trained
    instruction = ca.get_task("libero_spatial", 0).instruction
    demo_file = synthetic_demo_file(tmp_path / "demos.hdf5", 6, instructions=(instruction,), obs_dims=(39, 70))
    train_policy.main(policy_args(d, demo_file, output=str(tmp_path / "policy.pt"), json=None, epochs=1))
    wrong = eval_args(policy=str(d / "policy.pt"), mode="dense", task_id=[0])
    with pytest.raises(ValueError, match="not trained on the instruction"):
        eval_libero.main(wrong)
    train_draft.main(draft_args(tmp_path / "policy.pt", tmp_path / "draft.pt", "--k", "2", "--epochs", "1",
                                "--hidden", "32", "--source", "obs", "--threads", "1"))
    train_draft.main(draft_args(tmp_path / "policy.pt", tmp_path / "heads.pt", "--heads", "1", "--epochs", "1",
                                "--heads_hidden", "16", "--threads", "1"))
    ev = eval_args(policy=str(tmp_path / "policy.pt"), draft=str(tmp_path / "draft.pt"),
                   heads=str(tmp_path / "heads.pt"), mode="all", task_id=[0], num_trials=1, max_steps=15, json=str(tmp_path / "e.json"))
    out = eval_libero.main(ev)
    assert list(out["modes"]) == ["dense", "rsd", "adaptive", "rsd+adaptive", "tree", "tree+adaptive", "heads",
                                  "heads+adaptive", "rsd+heads", "rsd+heads+adaptive"]
    for m, s in out["modes"].items():
        assert s["trials"] == 1 and s["errors"] == 0, s
        assert s["chunks"] == 2  # 15 steps, the whole 10-step chunk executed by default
    assert out["modes"]["dense"]["main_passes_per_chunk"] == 3
    assert out["modes"]["rsd"]["draft_passes_per_chunk"] == 1
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["per_task"]["0"]["rsd"]["trials"] == 1 and saved["config"]["replan_steps"] == 10
    assert saved["config"]["init_states"] == "held_out"
    for m, s in saved["per_task"]["0"].items():
        assert s["outcomes"] == [s["successes"]]
    # exact rsd, tree, heads and rsd+heads decode what dense decodes: same trial, same outcome
    for m in ("rsd", "tree", "heads", "rsd+heads"):
        assert saved["modes"][m]["vs_dense"]["only_this_solved"] == 0
        assert saved["modes"][m]["vs_dense"]["only_reference_solved"] == 0
    # and exact speculation with adaptive depth keeps adaptive's layers: the same outcome too
    for m in ("rsd+adaptive", "tree+adaptive", "heads+adaptive", "rsd+heads+adaptive"):
        assert saved["per_task"]["0"][m]["outcomes"] == saved["per_task"]["0"]["adaptive"]["outcomes"]
    expert = eval_libero.main(eval_args(mode="expert", task_id=[0], num_trials=1))
    assert expert["modes"]["expert"]["successes"] == 1


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
