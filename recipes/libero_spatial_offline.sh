#!/usr/bin/env bash
# Exact speculation on a real policy without the DAgger rounds, offline: the demos, tokenizer and first
# policy of recipes/libero_spatial.sh (written into its folder, so that recipe resumes from them), then
# in runs/libero_spatial_policy0 that policy's own rollouts (10 per task), its draft, self-drafting
# heads and stop model, 10 held-out rollouts per task and bench_decoding.py's side-by-side table of
# every exact mode (bench.json); the heads train 30 epochs. About 2 hours on 2 CPU cores; resumable like the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
export SUITE=${SUITE:-libero_spatial}
BASE=${BASE:-runs/$SUITE}
OUT=${OUT:-runs/${SUITE}_policy0}
OUT=$BASE UNTIL=policy0.pt bash recipes/pipeline.sh
mkdir -p "$OUT"
for f in demos.hdf5 tokenizer.pt policy0.pt; do
  [ -e "$OUT/$f" ] || ln -s "$(realpath "$BASE/$f")" "$OUT/$f"
done
export OUT ROUNDS=0 ROLLOUTS=${ROLLOUTS:-10} TRIALS=${TRIALS:-10} SEEDS=${SEEDS-} HEADS_EPOCHS=${HEADS_EPOCHS:-30} \
  MODES=${MODES:-dense,rsd,tree,heads:1,heads:2,heads,rsd+heads,adaptive,rsd+adaptive,tree+adaptive,heads+adaptive,rsd+heads+adaptive}
exec bash recipes/pipeline.sh
