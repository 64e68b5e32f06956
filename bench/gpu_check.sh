#!/usr/bin/env bash
# The GPU check: everything in rmtorch that needs a CUDA machine, in one run of at most ~8 minutes on one H100.
#
#   bash bench/gpu_check.sh prepare   # here (network, ../shared): wheels and data into tmp/gpu_check (git-ignored)
#   bash bench/gpu_check.sh           # on the GPU machine, from the repository root; carry tmp/gpu_check there
#
# With the device tool: run(command="bash bench/gpu_check.sh", carry=["tmp/gpu_check"], timeout_s=560).
# The GPU machine's image has torch, accelerate and peft but not trl, datasets or bitsandbytes, and cannot reach
# a package index; ../shared does not travel. `prepare` fetches the wheels (bitsandbytes keeps only its CUDA 13
# libraries, to stay inside the 64 MiB a call carries) and copies the Qwen3 tokenizer and config and the bench
# data. The run writes bench/results/gpu.json (and, where $OUT is set, copies it and the log there).
# Its last section times plain vLLM's offline engine beside rmtorch's scorer (bench/vllm_engine.py) where the
# image's python3 has vllm; the image has none today and vLLM's CUDA wheels are far over the 64 MiB a call carries,
# so the section then records why it was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=tmp/gpu_check

if [[ "${1:-}" == "prepare" ]]; then
    rm -rf "$ASSETS" && mkdir -p "$ASSETS/wheels" "$ASSETS/shared/qwen3_tokenizer" "$ASSETS/shared/data"
    # The versions this checkout is tested with; the GPU machine runs Python 3.12 on x86-64.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$ASSETS/wheels" \
        trl==1.16.0 datasets==5.2.0 peft==0.21.2 transformers==5.24.0 bitsandbytes==0.50.2 \
        "dill>=0.3,<0.4.2" "multiprocess<0.70.20"
    # bitsandbytes ships a library per CUDA version (43 MB); the GPU machine's torch is built for CUDA 13.
    (cd "$ASSETS/wheels" && mkdir bnb && cd bnb && python3 -m zipfile -e ../bitsandbytes-*.whl . \
        && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*_cpu.so' -delete \
        && rm ../bitsandbytes-*.whl && python3 -m zipfile -c ../bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl ./* \
        && cd .. && rm -rf bnb)
    cp ../shared/qwen3_tokenizer/{tokenizer.json,tokenizer_config.json,qwen3-0.6b-config.json} \
        "$ASSETS/shared/qwen3_tokenizer/"
    cp -r ../shared/data/llamafactory ../shared/data/r1_gsm8k "$ASSETS/shared/data/"
    du -sh "$ASSETS"
    exit 0
fi

check() {
    set -e
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if [[ -d "$ASSETS/wheels" ]]; then  # installed beside the image's packages, ahead of them on the path
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$ASSETS"/wheels/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    local shared=../shared
    [[ -d "$shared/qwen3_tokenizer" ]] || shared="$ASSETS/shared"
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    # gpu.json is rewritten after every section (and copied to $OUT), so a run cut short keeps what it measured.
    python3 bench/gpu_check.py --shared "$shared" --output bench/results/gpu.json --budget_s 420
}

mkdir -p bench/results
LOG="${OUT:-bench/results}/gpu_check.log"
check 2>&1 | tee "$LOG"
