#!/usr/bin/env bash
# The whole pipeline on one LIBERO suite: demos, tokenizer, policy, DAgger rounds, draft, heads, stop model,
# held-out rollouts, offline decoding benchmark, closed-loop evaluation over scene seeds, pooled table.
#
# Every step writes its output atomically and is skipped when that output exists, so a stopped run
# resumes where it stopped (collections continue their .partial file). Sizes come from the
# environment; recipes/libero_spatial.sh and recipes/smoke.sh set them. Run from anywhere:
#   OUT=runs/spatial bash recipes/pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

SUITE=${SUITE:-libero_spatial}
TASKS=${TASKS:-all}                      # task ids: 'all' or a comma list
OUT=${OUT:-runs/$SUITE}
WORKERS=${WORKERS:-2}
DEMOS=${DEMOS:-50}                       # expert demos per task (init states 20-49)
NOISE=${NOISE:-0.3}                      # the expert's variation
# unset: the 16-code MLP RVQ of the current best result; set but empty: train_rvq_tokenizer.py's default
TOKENIZER_FLAGS=${TOKENIZER_FLAGS---encoder mlp --latent_steps 3 --codebook_size 16 --epochs 20 --batch_size 256 --lr 2e-3}
POLICY_LAYERS=${POLICY_LAYERS:-}           # the policy predicts the tokenizer's first N layers; empty: all
# what the policy reads: the robot, the movable objects and, in the suites whose tasks play in several
# scenes with articulated fixtures (drawers, the stove's knob, the microwave's door), the fixtures'
# positions and joints (libero_goal's one scene: the same success without them, see RESULTS.md)
case $SUITE in libero_10|libero_90) fixture=" fixture-state" ;; *) fixture="" ;; esac
OBS_KEYS=${OBS_KEYS:-robot0_proprio-state object-state$fixture}
POLICY_EPOCHS=${POLICY_EPOCHS:-18}
ROUNDS=${ROUNDS:-3}                      # DAgger rounds, each fine-tuning the previous round's policy
TAKEOVER_EPISODES=${TAKEOVER_EPISODES:-30}   # per task and seed, two seeds per round
TAKEOVER=${TAKEOVER:-10:160}             # the expert takes over at a step drawn in this range
# a libero_10 take-over runs the learner's steps and then the expert's two stages (about 250-410 steps)
TAKEOVER_MAX_STEPS=${TAKEOVER_MAX_STEPS:-$([ "$SUITE" = libero_10 ] && echo 700 || echo 400)}
ROUND_EPOCHS=${ROUND_EPOCHS:-8}
ROUND_LR=${ROUND_LR:-1e-3}
ROLLOUTS=${ROLLOUTS:-30}                 # the final policy's own rollouts per task (training init states)
DRAFT_EPOCHS=${DRAFT_EPOCHS:-80}
HEADS=${HEADS:-3}                        # self-drafting heads: layers proposed per pass (0: no heads)
HEADS_EPOCHS=${HEADS_EPOCHS:-$DRAFT_EPOCHS}
STOP_EPOCHS=${STOP_EPOCHS:-60}
TRIALS=${TRIALS:-20}                     # held-out trials per task (init states 0..TRIALS-1)
SEEDS=${SEEDS-0 1 2}                     # scene seeds of the closed-loop runs (set but empty: none)
MODES=${MODES:-dense,rsd,rsd+adaptive$([ "${HEADS:-3}" = 0 ] || echo ,heads,heads+adaptive)}
THRESHOLD=${THRESHOLD:-0.13}             # the learned stop rule's predicted action gap
BENCH_STATES=${BENCH_STATES:-600}
BENCH_WARMUP=${BENCH_WARMUP:-20}         # untimed states first
MAX_STEPS=${MAX_STEPS:-}                 # per rollout / trial; empty: the suite's standard limit (demos always)
EXTRA=${EXTRA:-}                         # flags added to every collection and evaluation (e.g. --no_progress)
UNTIL=${UNTIL:-}                         # stop once this output (a file name in OUT, e.g. policy0.pt) exists

mkdir -p "$OUT"
step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists
  local out=$1; shift
  if [ -e "$out" ]; then echo "[skip] $out exists"
  else echo "[$(date +%T)] $*"; "$@"; fi
  if [ -n "$UNTIL" ] && [ "$(basename "$out")" = "$UNTIL" ]; then echo "[$(date +%T)] stopped after $out (UNTIL)"; exit 0; fi
}
steps=(); [ -n "$MAX_STEPS" ] && steps=(--max_steps "$MAX_STEPS")

step "$OUT/demos.hdf5" $PY collect_actions.py --task_suite "$SUITE" --task_id "$TASKS" --num_episodes "$DEMOS" \
  --noise "$NOISE" --workers "$WORKERS" --resume $EXTRA --output "$OUT/demos.hdf5" --json "$OUT/demos.json"
step "$OUT/tokenizer.pt" $PY train_rvq_tokenizer.py --data "$OUT/demos.hdf5" $TOKENIZER_FLAGS \
  --output "$OUT/tokenizer.pt" --json "$OUT/tokenizer.json"
layers=(); [ -n "$POLICY_LAYERS" ] && layers=(--num_layers "$POLICY_LAYERS")
step "$OUT/policy0.pt" $PY train_policy.py --data "$OUT/demos.hdf5" --tokenizer "$OUT/tokenizer.pt" "${layers[@]}" \
  --obs_keys $OBS_KEYS --epochs "$POLICY_EPOCHS" --output "$OUT/policy0.pt" --json "$OUT/policy0.json"

# DAgger: in round r the policy of round r-1 drives from the training init states and the scripted
# expert takes over (two seeds); the new policy fine-tunes it on the demos and every takeover so far.
takeovers=()
for r in $(seq 1 "$ROUNDS"); do
  for s in $((2 * r - 2)) $((2 * r - 1)); do
    step "$OUT/takeover_s$s.hdf5" $PY collect_actions.py --policy token --checkpoint "$OUT/policy$((r - 1)).pt" \
      --task_suite "$SUITE" --task_id "$TASKS" --init_states train --num_episodes "$TAKEOVER_EPISODES" \
      --takeover "$TAKEOVER" --max_steps "$TAKEOVER_MAX_STEPS" --seed "$s" --workers "$WORKERS" --resume $EXTRA \
      --output "$OUT/takeover_s$s.hdf5" --json "$OUT/takeover_s$s.json"
    takeovers+=("$OUT/takeover_s$s.hdf5")
  done
  step "$OUT/policy$r.pt" $PY train_policy.py --data "$OUT/demos.hdf5" "${takeovers[@]}" --tokenizer "$OUT/tokenizer.pt" \
    "${layers[@]}" --obs_keys $OBS_KEYS --init "$OUT/policy$((r - 1)).pt" --epochs "$ROUND_EPOCHS" --lr "$ROUND_LR" --output "$OUT/policy$r.pt" \
    --json "$OUT/policy$r.json"
done
POLICY="$OUT/policy$ROUNDS.pt"

# The final policy's own rollouts (training init states) teach the draft and the stop model.
step "$OUT/rollouts.hdf5" $PY collect_actions.py --policy token --checkpoint "$POLICY" --task_suite "$SUITE" \
  --task_id "$TASKS" --init_states train --num_episodes "$ROLLOUTS" --workers "$WORKERS" --resume "${steps[@]}" $EXTRA \
  --output "$OUT/rollouts.hdf5" --json "$OUT/rollouts.json"
step "$OUT/draft.pt" $PY train_draft.py --policy "$POLICY" --rollouts "$OUT/rollouts.hdf5" --source embedding \
  --depth 3 --rank 64 --gt_weight 0.1 --epochs "$DRAFT_EPOCHS" --output "$OUT/draft.pt" --json "$OUT/draft.json"
heads=()
if [ "$HEADS" != 0 ]; then
  step "$OUT/heads.pt" $PY train_draft.py --policy "$POLICY" --rollouts "$OUT/rollouts.hdf5" --heads "$HEADS" \
    --epochs "$HEADS_EPOCHS" --output "$OUT/heads.pt" --json "$OUT/heads.json"
  heads=(--heads "$OUT/heads.pt")
fi
step "$OUT/stop.pt" $PY train_stop.py --policy "$POLICY" --rollouts "$OUT/rollouts.hdf5" --epochs "$STOP_EPOCHS" \
  --thresholds 0.1,0.13,0.15 --output "$OUT/stop.pt" --json "$OUT/stop.json"

# Offline: every mode on the final policy's own held-out rollouts, side by side.
step "$OUT/heldout.hdf5" $PY collect_actions.py --policy token --checkpoint "$POLICY" --task_suite "$SUITE" \
  --task_id "$TASKS" --init_states held_out --num_episodes "$TRIALS" --workers "$WORKERS" --resume "${steps[@]}" $EXTRA \
  --output "$OUT/heldout.hdf5" --json "$OUT/heldout.json"
step "$OUT/bench.json" $PY bench_decoding.py --policy "$POLICY" --draft "$OUT/draft.pt" "${heads[@]}" --stop_model "$OUT/stop.pt" \
  --data "$OUT/heldout.hdf5" --mode "$MODES" --adaptive_threshold "$THRESHOLD" --max_states "$BENCH_STATES" \
  --warmup "$BENCH_WARMUP" --json "$OUT/bench.json"

# Closed loop: the held-out trials once per scene seed, then pooled.
evals=()
for s in $SEEDS; do
  step "$OUT/eval_s$s.json" $PY eval_libero.py --policy "$POLICY" --draft "$OUT/draft.pt" "${heads[@]}" --stop_model "$OUT/stop.pt" \
    --task_suite "$SUITE" --task_id "$TASKS" --num_trials "$TRIALS" --mode "$MODES" --adaptive_threshold "$THRESHOLD" \
    --seed "$s" --workers "$WORKERS" "${steps[@]}" --json "$OUT/eval_s$s.json" --plot "$OUT/eval_s$s.png"
  evals+=("$OUT/eval_s$s.json")
done
if [ "${#evals[@]}" -ge 2 ]; then
  step "$OUT/eval_pooled.json" $PY report_libero.py --pool "${evals[@]}" --json "$OUT/eval_pooled.json" \
    --plot "$OUT/eval_pooled.png"
fi
echo "[$(date +%T)] done: $OUT"
