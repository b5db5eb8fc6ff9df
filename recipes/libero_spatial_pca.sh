#!/usr/bin/env bash
# The libero_spatial pipeline on the default tokenizer (the RVQ on the chunk's principal axes that
# train_rvq_tokenizer.py fits by default), the policy predicting its first 8 layers (128 bits), every
# other step as recipes/libero_spatial.sh. Its closed-loop table answers whether one tokenizer can
# serve the whole chain as well as the 16-code MLP RVQ (notebook/2026-12-02-default-tokenizer.md).
set -euo pipefail
export SUITE=${SUITE:-libero_spatial}
export OUT=${OUT:-runs/${SUITE}_pca}
export TOKENIZER_FLAGS=${TOKENIZER_FLAGS:-} POLICY_LAYERS=${POLICY_LAYERS:-8}
exec bash "$(dirname "$0")/pipeline.sh"
