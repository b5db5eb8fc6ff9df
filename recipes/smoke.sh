#!/usr/bin/env bash
# The whole pipeline at toy sizes (2 tasks, 2 demos each, 1 epoch per model, 1 DAgger round, 2 trials
# per task, one scene seed): checks that every step runs and reads the previous one's files, in a few
# minutes. Its numbers mean nothing. OUT defaults to runs/smoke.
set -euo pipefail
export OUT=${OUT:-runs/smoke} SUITE=libero_spatial TASKS=0,1 WORKERS=${WORKERS:-2} DEMOS=2 NOISE=0.3 \
  TOKENIZER_FLAGS="--encoder mlp --latent_steps 3 --codebook_size 16 --num_layers 4 --epochs 1 --batch_size 64" \
  POLICY_EPOCHS=1 ROUNDS=1 TAKEOVER_EPISODES=1 TAKEOVER=5:20 TAKEOVER_MAX_STEPS=40 ROUND_EPOCHS=1 ROLLOUTS=2 \
  DRAFT_EPOCHS=1 HEADS=2 STOP_EPOCHS=2 TRIALS=2 SEEDS=0 MODES=dense,rsd,rsd+adaptive,heads BENCH_STATES=10 BENCH_WARMUP=2 MAX_STEPS=40 \
  EXTRA=--no_progress
exec bash "$(dirname "$0")/pipeline.sh"
