"""bench_decoding.py (every mode against dense on recorded states), the stop-rule study
(stop_study.py, bench_decoding.py --stop_study) and train_stop.py's learned stop rule."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import h5py
import numpy as np
import pytest
import torch

import bench_decoding
import cli
import eval_libero
import policy_models as pm
import stop_study
import train_draft
import train_stop
from policy_fixtures import draft, draft_args, rollout_file, trained, workdir  # noqa: F401
from rsd_engine_core import EngineConfig, LearnedStop, RSDEngine, stop_rule_of
from rvq_tokenizer import load_tokenizer


def bench_args(*argv) -> bench_decoding.BenchArgs:
    return bench_decoding.build_parser().parse_args([str(a) for a in argv])


def models(d):
    policy, _ = pm.load_policy(str(d / "policy.pt"))
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    return policy, tok


# ---------------------------------------------------------------- bench_decoding


def test_bench_decoding_compares_every_mode_with_dense_on_recorded_states(trained, tmp_path):
    """With a chained draft (trained here), which the engine feeds its own proposals."""
    d, _, _ = trained
    policy, tok = models(d)
    draft = tmp_path / "draft.pt"
    train_draft.main(draft_args(d / "policy.pt", draft, "--k", "2", "--epochs", "3", "--hidden", "32",
                                "--threads", "1", "--source", "embedding", "--chained", "--step_hidden", "16"))
    loaded = pm.load_draft(str(draft))[0]
    assert loaded.config.chained and loaded.steps[0].out_features == 16
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1, 2], n=6)
    out = tmp_path / "bench.json"
    args = bench_args("--policy", d / "policy.pt", "--draft", draft, "--data", roll, "--warmup", "2",
                      "--mode", "rsd,rsd@relaxed:1,rsd+adaptive,adaptive", "--tolerance", "0.3",
                      "--adaptive_threshold", "1.0", "--json", out)
    result = bench_decoding.main(args)
    modes = result["modes"]
    assert list(modes) == ["dense", "rsd", "rsd@relaxed:1", "rsd+adaptive", "adaptive"]
    # two drafts on the same states in one run: every speculative mode once per draft
    one_pass = tmp_path / "one_pass.pt"
    train_draft.main(draft_args(d / "policy.pt", one_pass, "--k", "2", "--epochs", "1", "--hidden", "32",
                                "--threads", "1", "--source", "embedding"))
    two = bench_decoding.main(bench_args(
        "--policy", d / "policy.pt", "--draft", draft, one_pass, "--data", roll,
        "--warmup", "0", "--max_states", "6", "--mode", "rsd,adaptive"))["modes"]
    assert list(two) == ["dense", "rsd (draft)", "rsd (one_pass)", "adaptive"]
    assert two["rsd (draft)"]["same_codes_as_dense"] == two["rsd (one_pass)"]["same_codes_as_dense"] == 1.0
    with pytest.raises(ValueError, match="different names"):
        bench_decoding.main(bench_args("--policy", d / "policy.pt", "--draft", draft, draft, "--data", roll))
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
    with pytest.raises(ValueError, match="other.hdf5.*open the drawer"):
        bench_decoding.main(dataclasses.replace(args, data=[unknown], json=None))


def test_bench_decoding_refuses_modes_the_draft_cannot_run(trained, draft, tmp_path):
    """Every row is checked against its engine before any state is decoded, naming the mode."""
    d, _, _ = trained
    policy, tok = models(d)
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=2)
    base = ["--policy", d / "policy.pt", "--data", roll, "--warmup", "0"]
    with pytest.raises(ValueError, match="--mode rsd:4: k = 4, but the draft proposes at most 3"):
        bench_decoding.main(bench_args(*base, "--draft", draft, "--mode", "rsd:4"))
    with pytest.raises(ValueError, match="--mode rsd needs a draft"):
        bench_decoding.main(bench_args(*base, "--mode", "rsd"))
    with pytest.raises(ValueError, match="--mode parallel is not benchmarked here"):
        bench_args(*base, "--mode", "parallel")
    with pytest.raises(SystemExit):  # the expert is not a decoding mode
        bench_args(*base, "--mode", "dense,expert")


def test_recorded_states_are_the_chunk_starts_the_policy_reads(trained, tmp_path):
    """policy_data.policy_states: the observation at steps 0, T, 2T, ... of every episode and its
    task index; other instructions or observation sizes are refused naming the file."""
    import demos
    from policy_data import chunk_start_states, obs_vector, policy_states

    d, _, _ = trained
    policy, tok = models(d)
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=3)
    eps = demos.load_episodes(roll, only_success=False)
    obs, tasks = policy_states(policy.config, 10, eps, roll)
    assert obs.shape == (3 * 3, policy.config.obs_dim) and tasks.tolist() == [0] * 3 + [1] * 3 + [0] * 3
    np.testing.assert_array_equal(obs[4], obs_vector(eps[1].obs, policy.config.obs_keys)[10])
    with_history, _ = chunk_start_states(eps, policy.config.obs_keys, 2, 10)
    assert with_history.shape == (9, policy.config.obs_dim + 14)
    np.testing.assert_array_equal(with_history[1, -7:], eps[0].actions[9])  # the last action before step 10
    small = dataclasses.replace(policy.config, obs_dim=policy.config.obs_dim + 1)
    with pytest.raises(ValueError, match=r"held_out.hdf5: observation vectors have 14 values, the policy expects 15"):
        policy_states(small, 10, eps, roll)
    other = dataclasses.replace(policy.config, instructions=("open the drawer",))
    with pytest.raises(ValueError, match=r"held_out.hdf5: the policy was not trained on the instruction"):
        policy_states(other, 10, eps, roll)


def test_bench_decoding_with_a_perfect_draft_accepts_every_proposed_layer(trained, tmp_path):
    d, _, _ = trained
    policy, tok = models(d)
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    args = bench_args("--policy", d / "policy.pt", "--oracle_draft", "--data", roll, "--warmup", "1",
                      "--mode", "rsd:1,rsd:2,rsd:3,tree:1/2,tree:2/3")
    result = bench_decoding.main(args)
    modes = result["modes"]
    assert result["draft"].startswith("oracle")
    for spec, k in (("rsd:1", 1), ("rsd:2", 2), ("rsd:3", 3), ("tree:1/2", 1), ("tree:2/3", 2)):
        m = modes[spec]
        assert m["acceptance_rate"] == 1.0 and m["accepted_layers_per_chunk"] == k
        assert m["same_codes_as_dense"] == 1.0 and m["fallbacks_per_chunk"] == 0
        # the verify pass, then dense passes for the layers after k + 1 (3 layers in all)
        assert m["main_passes_per_chunk"] == 1 + max(0, 3 - k - 1)
    # a blurred oracle misses some layers; the tree's further candidates recover some of them
    blurred = bench_decoding.main(dataclasses.replace(args, oracle_noise=0.7, mode=["rsd:2", "tree:2/4"]))
    assert "noise of standard deviation 0.7" in blurred["draft"]
    rsd, tree = blurred["modes"]["rsd:2"], blurred["modes"]["tree:2/4"]
    assert rsd["same_codes_as_dense"] == tree["same_codes_as_dense"] == 1.0
    assert rsd["acceptance_rate"] < 1 and tree["accepted_layers_per_chunk"] > rsd["accepted_layers_per_chunk"]
    with pytest.raises(ValueError, match="--oracle_noise blurs --oracle_draft"):
        dataclasses.replace(args, oracle_draft=False, oracle_noise=0.5)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(args, draft=["some_draft.pt"])
    with pytest.raises(ValueError, match="not sample"):
        dataclasses.replace(args, draft=None, mode=["rsd@sample:2"])


def test_coverage_ranks_the_dense_codes_among_the_draft_candidates(trained, draft, tmp_path):
    """--coverage: a perfect draft covers every layer with its first candidate; a blurred one
    covers more with more candidates and every layer once N spans all whole-layer codes; a trained
    draft's leading layers covered by its first candidates are exactly the layers rsd accepts on the
    same states (rsd proposes those candidates, exact acceptance keeps the leading matches)."""
    d, _, _ = trained
    policy, tok = models(d)
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    c = policy.config
    every = c.vocab ** c.latent_steps
    args = bench_args("--policy", d / "policy.pt", "--oracle_draft", "--data", roll, "--warmup", "1",
                      "--coverage", "--coverage_sizes", f"1,2,{every}", "--json", tmp_path / "coverage.json")
    perfect = bench_decoding.main(args)
    assert all(v == 1.0 for layer in perfect["covered"].values() for v in layer.values())
    assert perfect["leading_layers_covered_mean"]["1"] == c.num_layers
    assert len(perfect["main_top1_probability_mean"]) == c.num_layers
    assert json.loads((tmp_path / "coverage.json").read_text())["sizes"] == [1, 2, every]
    blurred = bench_decoding.main(dataclasses.replace(args, oracle_noise=0.7))
    for layer in blurred["covered"].values():
        assert layer["1"] <= layer["2"] <= layer[str(every)] == 1.0
    assert min(layer["1"] for layer in blurred["covered"].values()) < 1.0
    chained = tmp_path / "chained.pt"
    train_draft.main(draft_args(d / "policy.pt", chained, "--k", "2", "--epochs", "20", "--hidden", "32",
                                "--threads", "1", "--source", "embedding", "--chained"))
    for path in (draft, chained):
        covered = bench_decoding.main(dataclasses.replace(args, oracle_draft=False, draft=[str(path)]))
        timed = bench_decoding.main(dataclasses.replace(args, oracle_draft=False, draft=[str(path)], coverage=False,
                                                        mode=["rsd"]))["modes"]["rsd"]
        assert timed["fallbacks_per_chunk"] == 0
        assert covered["leading_layers_covered_mean"]["1"] == pytest.approx(timed["accepted_layers_per_chunk"])
        assert 0 < timed["accepted_layers_per_chunk"] < len(covered["covered"])
    with pytest.raises(ValueError, match="give one of --pass_costs, --stop_study and --coverage"):
        dataclasses.replace(args, stop_study=True)
    with pytest.raises(ValueError, match="--coverage measures a draft"):
        dataclasses.replace(args, oracle_draft=False)
    with pytest.raises(SystemExit):
        bench_args("--policy", d / "policy.pt", "--oracle_draft", "--data", roll, "--coverage", "--coverage_sizes", "0,4")


# ---------------------------------------------------------------- the stop rule study


def test_stop_study_measures_the_engine_rule_fixed_depths_and_the_oracle(trained, tmp_path):
    d, _, _ = trained
    policy, tok = models(d)
    L = policy.config.num_layers
    roll = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1, 2], n=6)
    out = tmp_path / "stop.json"
    args = bench_args("--policy", d / "policy.pt", "--data", roll, "--warmup", "2", "--stop_study",
                      "--stop_thresholds", "0,0.3,1e9", "--oracle_tolerances", "0,0.05,1e9", "--min_layers", "2",
                      "--json", out)
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
    signals, gaps = [], []
    for i, task in zip(order, tasks):
        signal, gap, learned = stop_study.layer_signals(engine, obs[i], task)
        assert learned is None
        assert gap[-1] == 0 and gap.shape == signal.shape == (L,)
        signals.append(signal)
        gaps.append(gap)
    tau = float(np.median([s[1] for s in signals]))
    cfg = EngineConfig(mode="adaptive", adaptive_threshold=tau, min_layers=2)
    depths = []
    for i, task, signal in zip(order, tasks, signals):
        codes, _ = engine.decode_codes(torch.as_tensor(obs[i])[None], torch.tensor([task]), cfg)
        depths.append(codes.shape[-1])
        assert stop_study.stop_depths(signal[None], tau, 2)[0] == codes.shape[-1]
    assert 2 in depths and L in depths
    # the study's rows are stop_study.study_rows of these signals and gaps (past the warm-up)
    rows = stop_study.study_rows(np.stack(gaps[2:]), np.stack(signals[2:]), None, None, [0, 0.3, 1e9], [],
                                 [0, 0.05, 1e9], 2)
    assert [(r["rule"], r["parameter"]) for r in rows] == [(r["rule"], r["parameter"]) for r in result["rules"]]
    for row, reported in zip(rows, result["rules"]):
        assert numbers(row) == pytest.approx(numbers(reported))
    # the engine's oracle stop keeps, on the same states, the layers of the study's oracle rows
    timed = bench_decoding.main(bench_args(
        "--policy", d / "policy.pt", "--data", roll, "--warmup", "2", "--oracle_stop",
        "--mode", "adaptive", "--adaptive_threshold", "0.05", "--min_layers", "2"))["modes"]["adaptive"]
    assert timed["states"] == result["data"]["states_decoded"]
    assert timed["layers_per_chunk"] == pytest.approx(rules[("oracle", 0.05)]["layers_mean"])
    assert timed["action_gap_vs_dense_max"] <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="--oracle_stop"):
        dataclasses.replace(args, oracle_stop=True)
    with pytest.raises(ValueError, match="--stop_study.*--draft"):
        dataclasses.replace(args, draft=["draft.pt"])
    for bad in ("", "a,b", "-1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
            cli.float_list(bad)
        with pytest.raises(SystemExit):
            bench_args("--policy", "p.pt", "--data", "x.hdf5", "--stop_thresholds", bad)


def test_stop_depths_is_the_first_layer_at_or_under_the_limit():
    values = np.array([[0.5, 0.1, 0.3, 0.0], [0.5, 0.4, 0.3, 0.2], [0.0, 0.9, 0.9, 0.9]])
    assert stop_study.stop_depths(values, 0.1, 1).tolist() == [2, 4, 1]
    assert stop_study.stop_depths(values, 0.1, 3).tolist() == [4, 4, 4]
    assert stop_study.stop_depths(values, 0.3, 3).tolist() == [3, 3, 4]


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("rule", "parameter")}


def test_stop_rule_row_reports_the_layers_kept_and_the_gap_left():
    gaps = np.array([[0.4, 0.2, 0.0], [0.3, 0.05, 0.0]])  # gap of the first n layers at n - 1
    row = stop_study.stop_rule_row(gaps, "fixed", 2, np.array([2, 2]))
    assert (row["rule"], row["parameter"]) == ("fixed", 2)
    assert numbers(row) == pytest.approx({"layers_mean": 2.0, "gap_mean": 0.125, "gap_p90": 0.185, "gap_max": 0.2,
                                          "gap_above_0.1": 0.5})
    row = stop_study.stop_rule_row(gaps, "oracle", 0.1, stop_study.stop_depths(gaps, 0.1, 1))
    assert (row["layers_mean"], row["gap_max"]) == (2.5, 0.05)


# ---------------------------------------------------------------- train_stop


def test_learned_stop_rule_is_trained_and_speculation_keeps_its_depth(trained, draft, tmp_path):
    """train_stop.py fits a stop model on the policy's own rollouts; the engine's adaptive modes
    stop where it predicts a small action gap, and exact speculation keeps the same layers and
    codes as dense decoding with the same rule, state by state."""
    d, _, _ = trained
    policy_path = str(d / "policy.pt")
    policy, tok = models(d)
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

    engine = RSDEngine(policy, tok, pm.load_draft(str(draft), policy_path)[0], stop_model=stop)
    states = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1], n=4)
    args = bench_args("--policy", policy_path, "--data", states, "--warmup", "0")
    _, obs, order, tasks = bench_decoding.recorded_states(args, engine)
    predicted = np.stack([stop_study.layer_signals(engine, obs[i], t)[2] for i, t in zip(order, tasks)])
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
        assert stop_study.stop_depths(p[None], math.log(tau + eps), 2)[0] == dense.shape[-1]
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
    # the stop model in the closed loop and the benchmark: --stop_model or --oracle_stop, not both
    with pytest.raises(ValueError, match="--stop_model.*--oracle_stop, not both"):
        eval_libero.build_parser().parse_args(["--stop_model", str(out), "--oracle_stop"])
    with pytest.raises(ValueError, match="--stop_model.*--oracle_stop, not both"):
        stop_rule_of(str(out), True)
    cfg = eval_libero.build_parser().parse_args(["--stop_model", str(out)]).engine_config("rsd+adaptive")
    assert cfg.stop_rule == "learned"
    # bench_decoding --stop_model: the adaptive mode keeps the learned rule's layers on these states
    bench = bench_decoding.main(dataclasses.replace(args, stop_model=str(out), mode=["adaptive"],
                                                    adaptive_threshold=tau, min_layers=2))
    assert bench["modes"]["adaptive"]["layers_per_chunk"] == pytest.approx(np.mean(depths))
    bad = rollout_file(tmp_path / "bad.hdf5", policy, tok, init_states=[20, 3])
    with pytest.raises(ValueError, match="bad.hdf5.*held-out init state 3"):
        train_stop.main(train_stop.build_parser().parse_args(base + ["--rollouts", bad, "--output", str(tmp_path / "s2.pt")]))
    assert not (tmp_path / "s2.pt").exists()
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        train_stop.main(train_stop.build_parser().parse_args(base + ["--rollouts", roll, "--epochs", "0"]))
