#!/usr/bin/env bash
# Quick start: install everything into .venv, then run the main job end to end (stage 02: weights + ONNX
# export; stage 06: segmentation + anatomical passports) on ct_data/ or, when it is empty, on the embedded
# synthetic CT phantom. Offline it uses the seeded stand-in weights and says so.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# the project itself, editable and without dependencies (all pinned above): puts totalseg-fast on the venv's PATH
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python 02_export_model.py
.venv/bin/python 06_inferenceAndPassport.py
