#!/usr/bin/env bash
# The GPU check of issue 8 in one command; the report is benchmarks/gpu_check.py's (read its
# docstring). From any directory:
#
#   bash benchmarks/gpu_check.sh [--quick] [--device cpu] [--no-compile] [--no-cpu-bf16]
#
# Needs python3 (or $PYTHON) with torch, torchaudio, transformers, safetensors, fsspec; not Ray.
# Without soundfile it decodes WAV with the stdlib, unless a wheel of it waits in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the machine has no network: fail fast, not slow

if ! "$PYTHON" -c "import soundfile" 2>/dev/null && [ -d .whl ]; then
    # Into .whl/site (git-ignored) rather than the system's site-packages, which may be
    # externally managed (PEP 668).
    if "$PYTHON" -m pip install -q --no-index --find-links .whl --target .whl/site soundfile; then
        export PYTHONPATH="$PYTHONPATH:$PWD/.whl/site"
    else
        echo "gpu_check: could not install soundfile from .whl/; decoding WAV with the stdlib"
    fi
fi

exec "$PYTHON" -u benchmarks/gpu_check.py "$@"
