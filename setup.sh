#!/usr/bin/env bash
# Builds the project's virtual environment in .venv from requirements.txt.
# Idempotent: a second run with unchanged requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
# LIBERO imports check that robosuite and mujoco load; fail here, not in the first test.
"$VENV/bin/python" -c "import torch, mujoco, robosuite, libero.libero; print('environment ready: torch', torch.__version__, 'mujoco', mujoco.__version__)"
echo "$want" > "$STAMP"
