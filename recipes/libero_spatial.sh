#!/usr/bin/env bash
# The current best libero_spatial result, end to end (RESULTS.md, closed loop): 500 expert demos, the
# 16-code tokenizer, a policy with three DAgger rounds, its draft and learned stop model, the offline
# benchmark and 3 x 200 closed-loop trials. About 4-5 hours on 2 CPU cores; stop it at any time and
# run it again to resume. Another suite the scripted expert solves: SUITE=libero_goal bash recipes/libero_spatial.sh
set -euo pipefail
export SUITE=${SUITE:-libero_spatial}
export OUT=${OUT:-runs/$SUITE}
exec bash "$(dirname "$0")/pipeline.sh"
