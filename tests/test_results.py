"""results.py (statistics of a saved closed-loop result) and report_libero.py (a saved run's
table and plot, two runs compared trial by trial, runs pooled over scene seeds)."""

from __future__ import annotations

import json
import re

import pytest

import report_libero
import results


def report(*argv):
    """report_libero.py with these arguments."""
    return report_libero.main(report_libero.build_parser().parse_args([str(a) for a in argv]))


# ---------------------------------------------------------------- statistics of a result


def test_wilson_interval_matches_reference_values():
    lo, hi = results.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert results.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    lo, hi = results.wilson_interval(183, 200)
    assert lo < 0.915 < hi and hi - lo < 0.1
    assert results.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_comparison_counts_discordant_trials_and_tests_them():
    dense = [1, 1, 1, 1, 1, 0, 0, 1]
    other = [0, 0, 0, 0, 0, 0, 1, 1]
    c = results.paired_comparison(dense, other)
    assert (c["only_this_solved"], c["only_reference_solved"]) == (1, 5)
    assert c["difference_points"] == pytest.approx(100 * (2 - 6) / 8)
    assert c["mcnemar_p"] == pytest.approx(2 * 7 / 64)  # P(X <= 1 or X >= 5), X ~ Bin(6, 1/2)
    same = results.paired_comparison(dense, dense)
    assert (same["only_this_solved"], same["only_reference_solved"], same["mcnemar_p"]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same trials"):
        results.paired_comparison([1, 0], [1])


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


# ---------------------------------------------------------------- a saved run (was eval_libero --from_json)


def test_report_gives_intervals_paired_tests_and_a_plot(tmp_path, capsys):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(saved_result()))
    out = report(path, "--plot", tmp_path / "eval.png", "--json", tmp_path / "again.json")
    vs = out["modes"]["rsd+adaptive"]["vs_dense"]
    assert (vs["trials"], vs["only_this_solved"], vs["only_reference_solved"]) == (8, 1, 2)
    assert "vs_dense" not in out["modes"]["dense"]
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert json.loads((tmp_path / "again.json").read_text())["modes"]["rsd+adaptive"]["vs_dense"] == vs
    table = capsys.readouterr().out
    assert "+1/-2" in table and "95% CI" in table
    # a result saved before per-trial outcomes were recorded: intervals, no paired test
    path.write_text(json.dumps(saved_result(with_outcomes=False)))
    old = report(path)
    assert "vs_dense" not in old["modes"]["rsd+adaptive"]
    assert old["modes"]["rsd+adaptive"]["success_ci95"] == pytest.approx(list(results.wilson_interval(2, 2)))


def test_report_refuses_what_it_cannot_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report(bad)
    bad.write_text(json.dumps({"modes": {"dense": {"trials": 3}}}))
    with pytest.raises(ValueError, match="not an eval_libero.py result"):
        report(bad)
    unpaired = saved_result()
    unpaired["per_task"]["0"]["rsd+adaptive"]["outcomes"].append(1)
    bad.write_text(json.dumps(unpaired))
    with pytest.raises(ValueError, match="task 0: rsd\\+adaptive has 5 trial outcomes, dense 4"):
        report(bad)
    # the result is an input: --json and --plot must not overwrite it
    bad.write_text(json.dumps(saved_result()))
    for flag in ("--json", "--plot"):
        with pytest.raises(ValueError, match=f"{flag} .* would overwrite an input"):
            report(bad, flag, bad)
    assert results.load_result(str(bad)) == saved_result()
    with pytest.raises(ValueError, match="give one result \\(or --compare / --pool / --suites\\), got 2"):
        report(bad, bad)


# ---------------------------------------------------------------- runs pooled (was eval_libero --pool)


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
    out = report("--pool", *paths, "--json", tmp_path / "pool.json")
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
    # a pooled result is reported again like any result
    assert report(tmp_path / "pool.json")["modes"]["rsd+adaptive"]["vs_dense"] == r["vs_dense"]
    # two pooled results pair trial by trial when they pool the same seeds in the same order
    again = str(tmp_path / "again.json")
    report("--pool", *paths, "--json", again)
    assert report("--compare", tmp_path / "pool.json", again)["dense"]["same_outcome"] == 24
    report("--pool", paths[1], paths[0], paths[2], "--json", again)
    with pytest.raises(ValueError, match="pool different trials \\(seeds \\[0, 1, 2\\] against \\[1, 0, 2\\]"):
        report("--compare", tmp_path / "pool.json", again)
    # what cannot be pooled is refused, naming why
    runs[1]["config"]["oracle_stop"] = False  # saved after the flag existed; the others before
    (tmp_path / "s1.json").write_text(json.dumps(runs[1]))
    assert report("--pool", *paths)["modes"]["dense"]["trials"] == 24
    runs[2]["config"]["seed"] = 0
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="s0.json and .*s2.json both ran seed 0"):
        report("--pool", *paths)
    runs[2]["config"] |= {"seed": 2, "adaptive_threshold": 0.07}
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="differ in adaptive_threshold \\(0.1 against 0.07\\)"):
        report("--pool", *paths)
    runs[2]["config"] |= {"adaptive_threshold": 0.1, "action_noise": 0.0}
    (tmp_path / "s2.json").write_text(json.dumps(runs[2]))
    with pytest.raises(ValueError, match="differ in action_noise \\(0.01 against 0.0\\)"):
        report("--pool", *paths)
    with pytest.raises(ValueError, match="two or more"):
        report("--pool", paths[0])
    with pytest.raises(ValueError, match="two or more"):
        results.pool_runs([runs[0]], paths[:1])
    with pytest.raises(ValueError, match="give one of --compare, --pool and --suites"):
        report("--pool", "--compare", *paths[:2])


def test_pool_setting_defaults_stand_for_runs_saved_before_the_flag():
    """A setting missing from an older result counts as the value such runs had."""
    assert set(results.SETTING_DEFAULTS) <= set(results.SETTING_KEYS)
    assert "seed" in results.TRIAL_KEYS and "seed" not in results.SETTING_KEYS
    runs = [saved_result(), saved_result()]
    for seed, r in enumerate(runs):
        r["config"] = {"task_suite": "libero_spatial", "task_ids": [0, 1], "num_trials": 4, "seed": seed}
    runs[1]["config"] |= {k: v for k, v in results.SETTING_DEFAULTS.items()}
    pooled = results.pool_runs(runs, ["a.json", "b.json"])
    assert pooled["modes"]["dense"]["trials"] == 16
    assert {k: pooled["config"][k] for k in results.SETTING_DEFAULTS} == results.SETTING_DEFAULTS
    runs[1]["config"]["expert_noise"] = 0.5
    with pytest.raises(ValueError, match="differ in expert_noise \\(1.0 against 0.5\\)"):
        results.pool_runs(runs, ["a.json", "b.json"])
    del runs[1]["config"]
    with pytest.raises(ValueError, match="b.json has no recorded config"):
        results.pool_runs(runs, ["a.json", "b.json"])


# ---------------------------------------------------------------- two runs compared (was eval_libero --compare)


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
    out = report("--compare", a, b, "--json", tmp_path / "cmp.json")
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
        report("--compare", a, b)
    second["config"]["seed"] = 0
    del second["per_task"]["1"]["dense"]["outcomes"]
    b.write_text(json.dumps(second))
    with pytest.raises(ValueError, match="no per-trial outcomes for dense in task 1"):
        report("--compare", a, b)
    with pytest.raises(FileNotFoundError, match="--compare: no such file"):
        report("--compare", a, tmp_path / "missing.json")
    only_expert = {"modes": {"expert": second["modes"]["expert"]}, "per_task": {}}
    b.write_text(json.dumps(only_expert))
    with pytest.raises(ValueError, match="no mode in common"):
        report("--compare", a, b)
    # --modes pairs two modes by name, here two of one run: its paired test against dense
    one = report("--compare", a, a, "--modes", "dense", "rsd+adaptive")
    assert list(one) == ["dense / rsd+adaptive"]
    c, vs = one["dense / rsd+adaptive"], report(a)["modes"]["rsd+adaptive"]["vs_dense"]
    assert (c["first_successes"], c["second_successes"], c["same_outcome"]) == (7, 6, 5)
    assert (c["only_second_solved"], c["only_first_solved"]) == (vs["only_this_solved"], vs["only_reference_solved"]) == (1, 2)
    with pytest.raises(ValueError, match=re.escape(f"{b} has no mode 'rsd+adaptive' (it has expert)")):
        report("--compare", a, b, "--modes", "dense", "rsd+adaptive")
    with pytest.raises(ValueError, match="--modes pairs two modes with --compare"):
        report(a, "--modes", "dense", "rsd+adaptive")
    with pytest.raises(ValueError, match="--compare takes two results, got 3"):
        report("--compare", a, a, b)
    with pytest.raises(ValueError, match="--compare prints a table"):
        report("--compare", a, a, "--plot", tmp_path / "cmp.png")


def test_compare_errors_name_report_libero_modes_flag(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(saved_result()))
    b.write_text(json.dumps({"modes": {"expert": {"successes": 8, "trials": 8, "success_rate": 1.0}},
                             "per_task": {}}))
    with pytest.raises(ValueError, match=re.escape(f"--modes: {b} has no mode 'rsd+adaptive' (it has expert)")):
        report("--compare", a, b, "--modes", "dense", "rsd+adaptive")
    with pytest.raises(ValueError, match=re.escape("(--modes pairs two modes of other names)")):
        report("--compare", a, b)


def test_pool_is_plotted(tmp_path):
    """ReportArgs: '--plot draws one result or a pool'."""
    paths = []
    for seed in range(2):
        r = saved_result()
        r["config"] = {"task_suite": "libero_spatial", "task_ids": [0, 1], "num_trials": 4, "seed": seed}
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(r))
    report("--pool", *paths, "--plot", tmp_path / "pool.png")
    assert (tmp_path / "pool.png").stat().st_size > 0


# ---------------------------------------------------------------- suites side by side


def suite_result(suite: str, dense: list[int], rsd: list[int], tasks: int = 10, speedup=1.2, pool_seeds=None):
    def row(outcomes, passes):
        return {"successes": sum(outcomes), "trials": len(outcomes), "success_rate": sum(outcomes) / len(outcomes),
                "errors": 0, "main_passes_per_chunk": passes}
    r = {"config": {"task_suite": suite, "task_ids": list(range(tasks)), "seed": 0},
         "modes": {"dense": row(dense, 8.0), "rsd": row(rsd, 7.0)}}
    if pool_seeds:  # a pooled result keeps each run's speed-up
        r["modes"]["rsd"]["speedup_vs_dense_per_run"] = list(pool_seeds)
        r["runs"] = [f"s{i}.json" for i in range(len(pool_seeds))]
    else:
        r["modes"]["rsd"]["speedup_vs_dense"] = speedup
    return r


def test_suites_table_sets_suites_side_by_side_in_the_standard_order(tmp_path, capsys):
    """Columns in the papers' order whatever the order of the files; the average over the four
    suites only for a mode that ran in all four; a run that left tasks out is marked; pooled runs
    show their range of speed-ups; the published rows follow, labelled."""
    files = {"goal": suite_result("libero_goal", [1, 1, 0, 0], [1, 1, 0, 0]),
             "spatial": suite_result("libero_spatial", [1, 1, 1, 0], [1, 1, 1, 0], pool_seeds=(1.1, 1.3)),
             "long": suite_result("libero_10", [1, 0, 0, 0], [1, 0, 0, 0], tasks=2),
             "object": suite_result("libero_object", [1, 1, 1, 1], [1, 1, 1, 1])}
    del files["object"]["modes"]["rsd"]
    paths = []
    for name, r in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        paths.append(tmp_path / f"{name}.json")
    out = report("--suites", *paths, "--json", tmp_path / "table.json")
    assert out["suites"] == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert out["modes"]["dense"]["average"] == pytest.approx((0.75 + 1.0 + 0.5 + 0.25) / 4)
    assert out["modes"]["rsd"]["average"] is None and "libero_object" not in out["modes"]["rsd"]
    assert not out["modes"]["dense"]["libero_10"]["all_tasks"] and out["modes"]["dense"]["libero_goal"]["all_tasks"]
    assert out["published"][1]["name"] == "OpenVLA" and out["published"][1]["average"] == pytest.approx(76.5)
    assert json.loads((tmp_path / "table.json").read_text())["runs"]["libero_goal"] == str(paths[0])
    table = capsys.readouterr().out
    rsd_row = next(line for line in table.splitlines() if line.startswith("rsd "))
    assert "75.0% 1.10-1.30x 7.00p" in rsd_row and "50.0% 1.20x 7.00p" in rsd_row and "25.0%*" in rsd_row
    assert "from camera images" in table
    # two results of one suite, or one without its suite, are refused
    with pytest.raises(ValueError, match="both libero_goal"):
        report("--suites", paths[0], paths[0])
    files["goal"]["config"].pop("task_suite")
    (tmp_path / "old.json").write_text(json.dumps(files["goal"]))
    with pytest.raises(ValueError, match="old.json records no task_suite"):
        report("--suites", tmp_path / "old.json", paths[1])
    with pytest.raises(ValueError, match="give one of --compare, --pool and --suites"):
        report("--suites", "--pool", *paths)


def expert_collection(suite: str, per_task: list[tuple[int, int]], policy: str = "scripted") -> dict:
    return {"suite": suite, "policy": policy, "episodes": sum(n for n, _ in per_task),
            "successes": sum(k for _, k in per_task), "wall_seconds": 600.0,
            "settings": {"init_states": "held_out"},
            "per_task": {str(i): {"episodes": n, "successes": k, "success_rate": k / n}
                         for i, (n, k) in enumerate(per_task)}}


def test_suites_table_sets_the_scripted_expert_and_the_paired_test_beside_the_policies(tmp_path, capsys):
    """--expert adds the expert's row from its collections (its suites' columns even where no policy
    ran), with its lowest task; a speculative cell carries its McNemar p against dense; the wall
    times of the evaluations and collections are printed; a policy's collection is refused."""
    r = suite_result("libero_spatial", [1, 1, 1, 0], [1, 1, 0, 0])
    r["config"]["wall_seconds"] = 1800.0
    r["modes"]["rsd"]["vs_dense"] = {"trials": 4, "only_this_solved": 0, "only_reference_solved": 1,
                                     "difference_points": -25.0, "mcnemar_p": 1.0}
    (tmp_path / "spatial.json").write_text(json.dumps(r))
    experts = {"spatial": expert_collection("libero_spatial", [(20, 20)] * 10),
               "goal": expert_collection("libero_goal", [(20, 19)] * 9 + [(20, 16)])}
    for name, e in experts.items():
        (tmp_path / f"expert_{name}.json").write_text(json.dumps(e))
    out = report("--suites", tmp_path / "spatial.json", "--expert", tmp_path / "expert_goal.json",
                 tmp_path / "expert_spatial.json")
    assert out["suites"] == ["libero_spatial", "libero_goal"]
    assert out["expert"]["libero_goal"]["success_rate"] == pytest.approx(187 / 200)
    assert out["expert"]["libero_goal"]["min_task_success_rate"] == pytest.approx(0.8)
    assert out["expert"]["average"] is None
    table = capsys.readouterr().out
    expert_row = next(line for line in table.splitlines() if line.startswith("scripted expert"))
    assert "100.0%" in expert_row and "93.5%" in expert_row
    rsd_row = next(line for line in table.splitlines() if line.startswith("rsd "))
    assert "50.0% 1.20x 7.00p (p=1.00)" in rsd_row
    assert "libero_spatial: evaluation 30 min, expert collection 10 min" in table
    # the standard column order whatever the order of the files: an expert-only suite before a policy's
    r["config"]["task_suite"] = "libero_10"
    (tmp_path / "long.json").write_text(json.dumps(r))
    assert report("--suites", tmp_path / "long.json", "--expert", tmp_path / "expert_goal.json")["suites"] == [
        "libero_goal", "libero_10"]
    assert "libero_goal: expert collection 10 min" in table
    (tmp_path / "learner.json").write_text(json.dumps(expert_collection("libero_goal", [(20, 5)], policy="token")))
    with pytest.raises(ValueError, match="learner.json: collected by the 'token' policy, not the scripted expert"):
        report("--suites", tmp_path / "spatial.json", "--expert", tmp_path / "learner.json")
    with pytest.raises(ValueError, match="both libero_goal"):
        report("--suites", tmp_path / "spatial.json", "--expert", tmp_path / "expert_goal.json",
                tmp_path / "expert_goal.json")
    with pytest.raises(ValueError, match="--expert adds a row to the --suites table"):
        report(tmp_path / "spatial.json", "--expert", tmp_path / "expert_goal.json")
