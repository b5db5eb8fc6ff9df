"""Ctrl-C at random moments of a collection: it must stop within a few seconds, keep every
finished episode in ``<output>.partial`` and leave an existing ``<output>`` untouched.

    python tests/interrupt_collection.py --trials 20 --json interrupts.json

Each trial starts ``collect_actions.py`` (scripted expert, one task), waits a random time, sends
SIGINT as a terminal's Ctrl-C does (to the whole process group), and measures how long the run
takes to end. Moments are drawn over the whole run (start-up, env construction, resets,
episodes, the instant an episode is written). ``tests/test_interruptions.py`` runs a few trials.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_LIMIT_S = 10.0  # Ctrl-C must end the run within this many seconds
KEPT = re.compile(r"collection stopped after (\d+) complete episode")


def one_trial(delay: float, workdir: str, workers: int) -> dict:
    out = os.path.join(workdir, "demos.hdf5")
    for p in (out, out + ".partial"):
        if os.path.exists(p):
            os.remove(p)
    with open(out, "wb") as f:  # an earlier run's finished file, which must survive
        f.write(b"earlier output")
    cmd = [sys.executable, os.path.join(ROOT, "collect_actions.py"), "--task_id", "0", "--num_episodes", "40",
           "--noise", "0.3", "--workers", str(workers), "--output", out, "--no_progress"]
    # A shell without job control starts background jobs with SIGINT ignored, and a process that
    # starts so never sees Ctrl-C: the collection gets SIGINT's default, as from a terminal.
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    if proc.poll() is not None:
        return {"delay": delay, "error": "finished before the interrupt"}
    sent = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return {"delay": delay, "stop_seconds": None, "error": "did not stop within 60 s"}
    stop = time.perf_counter() - sent
    kept_claim = KEPT.search(err)
    partial = out + ".partial"
    in_partial = None
    if os.path.exists(partial):
        with h5py.File(partial) as f:
            in_partial = len([k for k in f["data"] if k.startswith("demo_")]) if "data" in f else 0
    with open(out, "rb") as f:
        untouched = f.read() == b"earlier output"
    ok = (stop <= STOP_LIMIT_S and untouched and "Traceback" not in err and proc.returncode == 130
          and (in_partial or 0) == (int(kept_claim.group(1)) if kept_claim else 0))
    return {"delay": round(delay, 2), "stop_seconds": round(stop, 2), "returncode": proc.returncode,
            "episodes_kept": in_partial, "episodes_reported": int(kept_claim.group(1)) if kept_claim else None,
            "output_untouched": untouched, "traceback": "Traceback" in err, "ok": ok,
            **({} if ok else {"stderr_tail": err[-3000:]})}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Send Ctrl-C to collect_actions.py at random moments and check "
                                            "that nothing is lost.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="runs, each interrupted once")
    p.add_argument("--max_delay", type=float, default=25.0, help="interrupts are drawn in [1, this] seconds")
    p.add_argument("--workers", type=int, default=1, help="collection processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    p.add_argument("--json", default=None, help="also write every trial as JSON")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    trials = []
    with tempfile.TemporaryDirectory() as workdir:
        for i in range(args.trials):
            trials.append(one_trial(float(rng.uniform(1.0, args.max_delay)), workdir, args.workers))
            print(f"trial {i}: {trials[-1]}", flush=True)
    good = [t for t in trials if t.get("ok")]
    stops = [t["stop_seconds"] for t in trials if t.get("stop_seconds") is not None]
    summary = {"trials": trials, "ok": len(good), "of": len(trials),
               "stop_seconds_max": max(stops) if stops else None,
               "stop_seconds_median": float(np.median(stops)) if stops else None}
    print(f"{len(good)}/{len(trials)} interrupts stopped within {STOP_LIMIT_S:.0f} s with every finished episode "
          f"kept and the earlier output untouched; stop time median {summary['stop_seconds_median']} s, "
          f"max {summary['stop_seconds_max']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    sys.exit(0 if (lambda s: s["ok"] == s["of"])(main()) else 1)
