#!/usr/bin/env bash
# Parity tests against peer libraries that need transformers<5 (steering-vectors), in their own
# venv (.venv-peers, created on first use). The method/steering/LM tests run there too, which
# checks that our code also works on the last 4.x release (tuple-returning decoder layers);
# `make test-oldest` runs the quick tier on the oldest transformers pyproject.toml admits.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-peers
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import steering_vectors" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${TORCH:-torch==2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  "$VENV/bin/pip" install -q 'transformers<5' steering-vectors peft pydantic pyarrow pytest pytest-timeout
fi
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::FutureWarning \
  tests/peers tests/test_steering.py tests/test_methods.py tests/test_lm.py tests/test_training.py "$@"
