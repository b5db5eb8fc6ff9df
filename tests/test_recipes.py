"""The recipes run: the smoke recipe takes the whole pipeline end to end at toy sizes, every step
reading the files of the step before, and a second run resumes (every step skipped)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import policy_models as pm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ["demos.hdf5", "tokenizer.pt", "policy0.pt", "takeover_s0.hdf5", "takeover_s1.hdf5", "policy1.pt",
           "rollouts.hdf5", "draft.pt", "heads.pt", "stop.pt", "heldout.hdf5", "bench.json", "eval_s0.json"]


def run_smoke(out):
    env = dict(os.environ, OUT=str(out), PY=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "recipes", "smoke.sh")], env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.integration
def test_smoke_recipe_runs_the_pipeline_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "smoke"
    first = run_smoke(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).exists(), f"{name} missing"
    result = json.loads((out / "eval_s0.json").read_text())
    assert list(result["modes"]) == ["dense", "rsd", "rsd+adaptive", "heads"]
    assert all(m["trials"] == 4 and m["errors"] == 0 for m in result["modes"].values())
    # exact speculation decodes what dense decoding decodes, state by state
    bench = json.loads((out / "bench.json").read_text())
    assert bench["modes"]["rsd"]["same_codes_as_dense"] == 1.0 and bench["modes"]["heads"]["same_codes_as_dense"] == 1.0
    second = run_smoke(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("[skip]") == len(OUTPUTS)


TOY = dict(TASKS="0", WORKERS="1", DEMOS="2", NOISE="0.3", POLICY_EPOCHS="1", ROUNDS="0", ROLLOUTS="2",
           TOKENIZER_FLAGS="--encoder mlp --latent_steps 3 --codebook_size 16 --num_layers 4 --epochs 1 --batch_size 64",
           DRAFT_EPOCHS="1", STOP_EPOCHS="2", TRIALS="2", BENCH_STATES="10", BENCH_WARMUP="2", MAX_STEPS="40",
           EXPERT_EPISODES="1", EXTRA="--no_progress")


def run_suites(runs):
    env = dict(os.environ, RUNS=str(runs), PY=sys.executable, SUITES="libero_object libero_goal", **TOY)
    return subprocess.run(["bash", os.path.join(ROOT, "recipes", "libero_suites.sh")], env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.integration
def test_suites_recipe_sets_every_suite_and_the_expert_in_one_table_and_resumes(tmp_path):
    """recipes/libero_suites.sh at toy sizes on two suites: the expert's collection and the pipeline
    in a folder per suite, then the four-suite table of their closed-loop runs with the expert's row;
    a second run skips every step."""
    first = run_suites(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = json.loads((tmp_path / "suites.json").read_text())
    assert table["suites"] == ["libero_object", "libero_goal"]
    assert list(table["modes"]) == ["dense", "rsd", "rsd+adaptive"]
    for suite in table["suites"]:
        assert table["modes"]["dense"][suite]["trials"] == 2 and not table["modes"]["dense"][suite]["all_tasks"]
        assert table["expert"][suite]["trials"] == 1
        assert table["runs"][suite] == str(tmp_path / suite / "eval_s0.json")
    for suite in table["suites"]:  # fixture-state is added for libero_10 and libero_90 only
        assert pm.load_policy(str(tmp_path / suite / "policy0.pt"))[0].config.obs_keys == pm.DEFAULT_OBS_KEYS
    assert "scripted expert" in first.stdout and "from camera images" in first.stdout
    second = run_suites(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("expert.json exists") == 2
    ran = [line for line in second.stdout.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] (?!done: )", line)]
    assert not ran, ran
