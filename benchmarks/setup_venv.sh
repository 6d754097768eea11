#!/usr/bin/env bash
# Create the benchmark virtualenv: torch/torchvision for exporting the corpus, the
# five lossless optimizers we compare against, and this repo (editable).
#
#   bash benchmarks/setup_venv.sh            # -> /work/venv-bench
#   bash benchmarks/setup_venv.sh /tmp/venv  # or VENV=/tmp/venv bash benchmarks/setup_venv.sh
#
# A competitor that fails to install is only warned about: run_lossless.py reports it
# as "missing" in the table instead of crashing.
set -uo pipefail

VENV="${1:-${VENV:-/work/venv-bench}}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || { echo "setup_venv: cannot create $VENV" >&2; exit 1; }
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q --upgrade pip setuptools wheel >/dev/null 2>&1 || true

# Pinned torch: these wheels are on this machine's disk; any other version is a multi-GB download.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1 || { echo "setup_venv: torch install failed" >&2; exit 1; }
# Core: the repo's own requirements plus the versions the anchor numbers were measured with.
"${PIP[@]}" onnx==1.23.2 onnxruntime onnx-graphsurgeon psutil numpy || { echo "setup_venv: core install failed" >&2; exit 1; }
"${PIP[@]}" -e "$REPO" || { echo "setup_venv: installing $REPO failed" >&2; exit 1; }

# Competitors and exporter helpers, one at a time so one failure does not block the rest.
# onnx is re-pinned each time so no tool's dependency resolution can move it.
failed=()
# transformers builds BERT-base for the corpus (random weights, offline: no hub download).
for pkg in onnxscript onnxslim onnxsim onnxoptimizer polygraphy transformers; do
    if ! "${PIP[@]}" "$pkg" onnx==1.23.2; then
        echo "setup_venv: WARNING: $pkg failed to install; the benchmark will report it as missing" >&2
        failed+=("$pkg")
    fi
done

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ["torch", "torchvision", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript",
             "onnxslim", "onnxsim", "onnxoptimizer", "polygraphy", "psutil", "onnxslim-opt"]:
    try:
        print(f"  {name:20} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:20} MISSING")
EOF
if [ ${#failed[@]} -gt 0 ]; then
    echo "setup_venv: done, without: ${failed[*]}"
else
    echo "setup_venv: done: $VENV"
fi
