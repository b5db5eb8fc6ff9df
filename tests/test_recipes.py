"""The recipes run: the smoke recipe takes the whole pipeline end to end at toy sizes, every step
reading the files of the step before, and a second run resumes (every step skipped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
