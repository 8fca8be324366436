#!/usr/bin/env bash
# Creates ./.venv and installs stylelora into it. Idempotent: a second run only checks.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   plus the test tools (pytest, gradio_client, playwright + Debian chromium)
# Torch: if .venv already has a torch (e.g. a CUDA build you installed first), it is kept.
# Otherwise TORCH_SPEC is installed (default torch==2.13.0: the CPU wheel on our machines;
# elsewhere pass e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "stylelora needs Python 3.11 or newer (its pinned diffusers and transformers do); $PY is $("$PY" --version 2>&1)." >&2
  echo "Run it with a newer one: PYTHON=python3.11 bash scripts/setup.sh" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"$VPY" -m pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import stylelora.deps as d; d.check_versions()"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The browser test drives Debian's chromium through Playwright (no browser download).
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the browser test will be skipped"
fi
