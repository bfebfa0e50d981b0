#!/usr/bin/env bash
# The GPU measurements, in one go, on a machine with an NVIDIA GPU and its driver but no
# Rust toolchain: the binary is built elsewhere (trainer/cuda/toolchain.sh, then
# `cargo build --release -p starling-trainer --features cuda`) and carried here.
#
#   trainer/cuda/gpu-bench.sh BINARY[.gz] OUT_DIR
#
# The stripped binary is about 71 MB, over the 64 MiB a device call carries; gzip -9
# makes it about 20 MB, and a .gz is unpacked here. It links libcublas.so.13,
# libcudart.so.13 and libcurand.so.10: where the loader does not find them, they are
# looked for in python3's NVIDIA wheels (PyTorch's CUDA 13 build has them).
#
# Writes into OUT_DIR: gpu.txt (nvidia-smi, the binary's libraries), agreement.jsonl
# (CPU f32 against GPU f32 and bf16 on one batch), throughput.jsonl (tokens/s and MFU of
# llama-125m and llama-1b in bf16 and f32), reference.jsonl (PyTorch eager on the same
# presets and shapes, trainer/cuda/torch_reference.py, where python3 has torch),
# codec.jsonl (compress speed on the host next to the GPU-to-host copy), and log.txt.
# Each measurement runs on its own, so one that fails (out of memory, say) is logged
# and the others still run.
#
# DEVICE (default cuda) and PRESETS (default "llama-125m llama-1b") may be overridden;
# DEVICE=cpu PRESETS=tiny checks this script on any machine. CHECKPOINT names a trained
# checkpoint directory (the demo's last one, say) to compare CPU and GPU on as well: a
# fresh model's near-uniform logits agree more easily than a trained one's.
set -uo pipefail

bin="$(realpath "${1:?usage: gpu-bench.sh BINARY[.gz] OUT_DIR}")"
out="${2:?usage: gpu-bench.sh BINARY[.gz] OUT_DIR}"
device="${DEVICE:-cuda}"
presets="${PRESETS:-llama-125m llama-1b}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
log="$out/log.txt"
export RUST_LOG="${RUST_LOG:-warn}"

if [[ "$bin" == *.gz ]]; then
    unpacked="$(mktemp -d)/starling-trainer"
    gunzip -c "$bin" >"$unpacked" && chmod +x "$unpacked"
    bin="$unpacked"
fi
libraries="$(ldd "$bin" 2>&1)"
wheels="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
if [[ "$libraries" == *"not found"* && -n "$wheels" ]]; then
    for lib in libcublas.so.13 libcudart.so.13 libcurand.so.10; do
        # shellcheck disable=SC2086 # several site-packages directories
        found="$(find $wheels -name "$lib" 2>/dev/null | head -1)"
        if [ -n "$found" ]; then
            LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
    export LD_LIBRARY_PATH
fi

# The batch shapes a preset is measured at, small to large, so that when a large one
# runs out of memory the largest that fits is known.
shapes() {
    case "$1" in
        llama-1b) echo 4x512 4x1024 ;;
        llama-125m) echo 8x512 16x1024 ;;
        *) echo 8x128 ;;
    esac
}

# Runs one measurement, appending its JSON rows to $1 and its errors to the log; one that
# runs past LIMIT seconds (default 240) is stopped, so the others still get their turn.
measure() {
    local into="$1"
    shift
    echo "== $*" >>"$log"
    local started=$SECONDS
    if timeout "${LIMIT:-240}" "$bin" "$@" --json >>"$out/$into" 2>>"$log"; then
        echo "   ok in $((SECONDS - started)) s" >>"$log"
    else
        echo "   FAILED (exit $?) after $((SECONDS - started)) s" >>"$log"
    fi
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    nvidia-smi 2>&1 | head -5
    echo "-- libraries the binary needs (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}):"
    ldd "$bin" 2>&1
    nproc
} >"$out/gpu.txt"

# Agreement first: if the GPU computes something else, the speeds mean nothing.
for preset in $presets; do
    measure agreement.jsonl bench agreement --device "$device" --preset "$preset" --shape 2x256
done
if [ -n "${CHECKPOINT:-}" ]; then
    measure agreement.jsonl bench agreement --device "$device" --checkpoint "$CHECKPOINT" --shape 8x128
fi

# Throughput: one row per process, bf16 then f32.
for preset in $presets; do
    for precision in bf16 f32; do
        for shape in $(shapes "$preset"); do
            measure throughput.jsonl bench throughput --device "$device" --precision "$precision" \
                --presets "$preset" --shapes "$shape" --threads 1 --steps 10
        done
    done
done

# PyTorch eager on the same presets and shapes, where this machine has it.
if [ "$device" != cpu ] && python3 -c 'import torch, transformers' 2>/dev/null; then
    for preset in $presets; do
        for precision in bf16 f32; do
            for shape in $(shapes "$preset"); do
                echo "== torch_reference.py --preset $preset --shape $shape --precision $precision" >>"$log"
                timeout "${LIMIT:-240}" python3 "$here/torch_reference.py" --preset "$preset" \
                    --shape "$shape" --precision "$precision" \
                    >>"$out/reference.jsonl" 2>>"$log" || echo "   FAILED" >>"$log"
            done
        done
    done
fi

# The codec runs on the host: what a GPU adds is the copy of θ back to it.
measure codec.jsonl bench codec --device "$device" --params 16M,256M --k 32,64

echo "done in $SECONDS s" >>"$log"
