#!/usr/bin/env bash
# Rebuild the AdapterHub parity fixtures (pefttutor/adapterhub_fixtures) in a side environment.
#
# AdapterHub's `adapters` 1.3.0 needs transformers 4.57 and cannot share the book's environment
# (transformers 5), so it gets its own virtual environment; only the safetensors files it writes reach the
# main tests (tests/test_adapters.py) and the adapters chapter. `.ci/run` calls this before pytest, so CI compares against fixtures
# made on the spot. Set ADAPTERHUB_VENV to reuse an environment between runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
side="${ADAPTERHUB_VENV:-$(mktemp -d)/adapterhub}"
if [ ! -x "$side/bin/python" ]; then
  python3 -m venv "$side"
  "$side/bin/pip" install --quiet "${ADAPTERHUB_TORCH:-torch==2.13.0}"
  "$side/bin/pip" install --quiet transformers==4.57.6 adapters==1.3.0 safetensors
fi
HF_HUB_OFFLINE=1 "$side/bin/python" "$here/make_fixtures.py" "$here/../../pefttutor/adapterhub_fixtures" 2>&1 \
  | grep -v "none are activated for the forward pass"
