#!/usr/bin/env bash
# The four-suite table (RESULTS.md): for each of libero_spatial, libero_object, libero_goal and libero_10,
# the scripted expert from init states 0-19 (20 per task), then recipes/pipeline.sh in RUNS/<suite> (demos,
# tokenizer, a policy with its DAgger rounds, draft, stop model, one closed-loop run of 10 tasks x 20
# held-out init states in the modes dense, rsd and rsd+adaptive), then the table:
#   report_libero.py --suites RUNS/*/eval_s0.json --expert RUNS/*/expert.json --json RUNS/suites.json
# Several hours per suite on 2 CPU cores; stop it at any time and run it again to resume. SUITES picks
# suites; the pipeline's sizes (ROUNDS, DEMOS, TRIALS, ...) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
SUITES=${SUITES:-libero_spatial libero_object libero_goal libero_10}
RUNS=${RUNS:-runs}
EXPERT_EPISODES=${EXPERT_EPISODES:-20}   # per task, from init states 0..EXPERT_EPISODES-1
export WORKERS=${WORKERS:-2} HEADS=${HEADS:-0} SEEDS=${SEEDS-0} TASKS=${TASKS:-all}
steps=(); [ -n "${MAX_STEPS:-}" ] && steps=(--max_steps "$MAX_STEPS")

evals=(); experts=()
for suite in $SUITES; do
  out=$RUNS/$suite
  mkdir -p "$out"
  if [ -e "$out/expert.json" ]; then echo "[skip] $out/expert.json exists"
  else
    echo "[$(date +%T)] the scripted expert on $suite"
    $PY collect_actions.py --task_suite "$suite" --task_id "$TASKS" --num_episodes "$EXPERT_EPISODES" \
      --init_states held_out --workers "$WORKERS" --resume "${steps[@]}" ${EXTRA:-} --output "$out/expert.hdf5" \
      --json "$out/expert.json"
  fi
  SUITE=$suite OUT=$out bash recipes/pipeline.sh
  seeds=($SEEDS)
  [ "${#seeds[@]}" -ge 1 ] || { echo "SEEDS is empty: no closed-loop run to set in the table" >&2; exit 2; }
  evals+=("$out/$([ "${#seeds[@]}" -ge 2 ] && echo eval_pooled.json || echo "eval_s${seeds[0]}.json")")
  experts+=("$out/expert.json")
done
$PY report_libero.py --suites "${evals[@]}" --expert "${experts[@]}" --json "$RUNS/suites.json"
