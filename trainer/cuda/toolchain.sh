#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler and headers from NVIDIA's PyPI packages, with no system
# toolkit and no GPU needed, and arranges them as a toolkit directory that nvcc, cudarc
# and candle's kernel build expect. Prints the environment to build with:
#
#   eval "$(trainer/cuda/toolchain.sh)"
#   cargo build --release -p starling-trainer --features cuda
#
# STARLING_CUDA_DIR (default .starling/cuda) holds it; a second run reuses it.
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); candle's kernels are built for it only.
set -euo pipefail

dir="${STARLING_CUDA_DIR:-.starling/cuda}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
python="${PYTHON:-python3}"

if [ ! -x "$dir/venv/bin/python" ]; then
    "$python" -m venv "$dir/venv" >&2
fi
if [ ! -f "$dir/.installed" ]; then
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 \
        nvidia-cuda-crt==13.0.88 \
        nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 \
        nvidia-cublas==13.0.2.14 >&2
    touch "$dir/.installed"
fi

# The CUDA 13 wheels share one toolkit-shaped tree, nvidia/cu13 (bin, include, lib).
home="$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
# The wheels name their libraries by soname only; the linker looks for lib*.so.
for lib in "$home"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done
[ -e "$home/lib64" ] || ln -s lib "$home/lib64"

# The driver library (libcuda.so.1) comes with the GPU's driver, not with any wheel, yet
# cudarc links against it. A stub that defines every driver function cudarc declares,
# with the real library's soname, satisfies the linker; at run time the node's driver
# is what loads.
cudarc="$(sed -n '/^name = "cudarc"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)"
bindings="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc"/src/driver/sys/mod.rs 2>/dev/null | head -1)"
if [ -z "$bindings" ]; then
    cargo fetch --locked >&2
    bindings="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc"/src/driver/sys/mod.rs | head -1)"
fi
mkdir -p "$home/lib/stubs"
sed -n 's/^pub unsafe fn \(cu[A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$bindings" | sort -u > "$home/lib/stubs/cuda.c"
${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/cuda.c"

echo "export CUDA_HOME='$home' CUDA_PATH='$home' CUDA_ROOT='$home'"
echo "export PATH='$home/bin':\"\$PATH\""
echo "export LIBRARY_PATH='$home/lib:$home/lib/stubs':\"\${LIBRARY_PATH:-}\""
echo "export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'"
