#!/usr/bin/env bash
# Sets up cotgen on a fresh machine: a virtual environment in .venv with the CPU build
# of torch 2.13.0 first (a looser requirement would pull a CUDA build), then cotgen.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
