#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu against the installed torch headers.
#
# Works with the CPU torch wheel (no GPU, no CUDA torch needed): only nvcc and the torch
# headers are used; objects go to a temp dir that is removed on exit. Exits non-zero on any
# compile error (or when nvcc / the sources are missing).
#
# Environment:
#   PYTHON      interpreter whose torch provides the headers (default: python)
#   NVCC        nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   NVCC_ARCH   target flags (default: -gencode arch=compute_90,code=sm_90, i.e. H100)
#   NVCC_JOBS   files compiled at once (default: the CPU count)
#   NVCC_HOST_OPT  host compiler optimisation (default: -O0; -O3 is what setup.py builds with)
#   NVCC_EXTRA  more nvcc flags, e.g. "--time FILE" for each phase's time (cudafe++, cicc, ptxas, gcc)
#
# Flags mirror what setup.py's CUDAExtension passes: torch's COMMON_NVCC_FLAGS
# (-D__CUDA_NO_HALF_OPERATORS__ ... --expt-relaxed-constexpr), -fPIC,
# -DTORCH_API_INCLUDE_EXTENSION_H, -DTORCH_EXTENSION_NAME=_C, the wheel's C++ ABI, plus
# setup.py's own -std=c++20 -DGRADKIT_CUDA; the host side is compiled at -O0 (NVCC_HOST_OPT; setup.py
# uses -O3), which finds the same errors ~25% sooner (223 s instead of ~300 s for the 7 files on 2 cores):
# nvcc's -O sets the host compiler's level only, device code is optimised by ptxas as in the real build.
# The .cu files include ATen/core/Tensor.h and the ATen/ops/<op>.h headers they call, never ATen/ATen.h
# (which parses every operator's declaration in cudafe++, cicc and gcc): 201 s instead of 286 s for the 7
# files on a 2-core Zen 3 (session 20). Keep new includes to that set: each compile writes its header
# list (-MD -MF, no extra pass) and a file fails when that list holds one of SLIM_FORBIDDEN (the umbrella
# headers that parse every operator's declaration: ATen/Functions.h, and what includes it).
#
# CPU-wheel header gap: torch's CPU wheel ships c10/cuda/*.h but not the build-generated
# c10/cuda/impl/cuda_cmake_macros.h (on Linux it only defines C10_CUDA_BUILD_SHARED_LIBS,
# which matters for _WIN32 dllexport only). When it is absent we pass
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE, torch's own switch to skip that include. The kernels
# do not include ATen/cuda/CUDAContext.h (it needs cuSPARSE/cuBLAS headers), so no other
# shim is needed and the same source builds unchanged in a real CUDA torch build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

if [[ -n "${NVCC:-}" ]]; then
  :
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME}/bin/nvcc"
else
  echo "nvcc_check: nvcc not found (not on PATH, \$NVCC and \$CUDA_HOME unset)" >&2
  exit 2
fi

shopt -s nullglob
# Arguments, when given, are the .cu files to check (default: all of csrc/cuda/*.cu).
if [[ $# -gt 0 ]]; then
  SOURCES=("$@")
else
  SOURCES=("$ROOT"/csrc/cuda/*.cu)
fi
shopt -u nullglob
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "nvcc_check: no csrc/cuda/*.cu sources found under $ROOT" >&2
  exit 2
fi

# One python call for everything torch-specific: include dirs, torch's nvcc flags, C++ ABI,
# torch include root, version.
mapfile -t TORCH_INFO < <("$PYTHON" - <<'EOF'
import os
import torch
from torch.utils import cpp_extension as ce
print(" ".join("-I" + p for p in ce.include_paths()))
print(" ".join(ce.COMMON_NVCC_FLAGS))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.join(os.path.dirname(torch.__file__), "include"))
print(torch.__version__, "cuda=" + str(torch.version.cuda))
EOF
)
if [[ ${#TORCH_INFO[@]} -ne 5 ]]; then
  echo "nvcc_check: could not query torch with $PYTHON" >&2
  exit 2
fi
read -r -a INCLUDES <<<"${TORCH_INFO[0]}"
read -r -a TORCH_NVCC_FLAGS <<<"${TORCH_INFO[1]}"
CXX11_ABI="${TORCH_INFO[2]}"
TORCH_INC="${TORCH_INFO[3]}"
TORCH_DESC="${TORCH_INFO[4]}"

DEFINES=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "-D_GLIBCXX_USE_CXX11_ABI=${CXX11_ABI}" -DGRADKIT_CUDA)
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  DEFINES+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  HDR_NOTE="c10/cuda/impl/cuda_cmake_macros.h absent (CPU wheel): -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
else
  HDR_NOTE="c10/cuda/impl/cuda_cmake_macros.h present"
fi

if [[ " ${TORCH_NVCC_FLAGS[*]} " != *" --expt-relaxed-constexpr "* ]]; then
  TORCH_NVCC_FLAGS+=(--expt-relaxed-constexpr)
fi
read -r -a ARCH <<<"${NVCC_ARCH:--gencode arch=compute_90,code=sm_90}"
# 3306 / -Wc++20-extensions: torch's own headers use C++20 bit-field initialisers under -std=c++20.
FLAGS=(-std=c++20 "${NVCC_HOST_OPT:--O0}" "${TORCH_NVCC_FLAGS[@]}" --compiler-options -fPIC
       -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions "${ARCH[@]}")

OBJDIR="$(mktemp -d "${TMPDIR:-/tmp}/gradkit_nvcc_check.XXXXXX")"
trap 'rm -rf "$OBJDIR"' EXIT

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
echo "nvcc_check: torch $TORCH_DESC, headers $TORCH_INC"
echo "nvcc_check: $HDR_NOTE"
echo "nvcc_check: flags ${FLAGS[*]} ${DEFINES[*]}"
echo "nvcc_check: objects -> $OBJDIR (removed on exit)"

# Files compile in parallel, NVCC_JOBS at a time (default: the CPU count); each one's output is kept in
# its own log and printed in source order afterwards.
JOBS="${NVCC_JOBS:-$(nproc 2>/dev/null || echo 1)}"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || JOBS=1
SLIM_FORBIDDEN=(ATen/Functions.h ATen/ATen.h ATen/NativeFunctions.h ATen/TensorOperators.h torch/types.h
                torch/extension.h torch/all.h)
compile_one() {
  local src="$1" rel="${1#"$ROOT"/}" obj dep start hdr bad=()
  obj="$OBJDIR/$(basename "${src%.cu}").o"
  dep="${obj%.o}.d"
  start=$(date +%s)
  if "$NVCC" -c "$src" -o "$obj" -MD -MF "$dep" ${NVCC_EXTRA:-} "${INCLUDES[@]}" "${DEFINES[@]}" "${FLAGS[@]}"; then
    for hdr in "${SLIM_FORBIDDEN[@]}"; do
      grep -q "/include/$hdr\\b" "$dep" && bad+=("$hdr")
    done
    if [[ ! -s "$dep" ]]; then
      echo "nvcc_check: FAIL $rel: nvcc wrote no header list ($dep)"
    elif [[ ${#bad[@]} -ne 0 ]]; then
      echo "nvcc_check: FAIL $rel includes ${bad[*]} (directly or through another header): include" \
           "ATen/core/Tensor.h and the ATen/ops/<op>.h headers it calls instead (see this script's header)"
    else
      echo "nvcc_check: OK   $rel ($(( $(date +%s) - start ))s, $(wc -c <"$obj") bytes, $(grep -c '\.h' "$dep") header lines)"
    fi
  else
    echo "nvcc_check: FAIL $rel ($(( $(date +%s) - start ))s)"
  fi
}
for src in "${SOURCES[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  compile_one "$src" >"$OBJDIR/$(basename "${src%.cu}").log" 2>&1 &
done
wait
failed=0
for src in "${SOURCES[@]}"; do
  log="$OBJDIR/$(basename "${src%.cu}").log"
  if grep -q '^nvcc_check: OK ' "$log"; then
    grep '^nvcc_check: OK ' "$log"
  else
    cat "$log" >&2
    failed=$((failed + 1))
  fi
done

if [[ $failed -ne 0 ]]; then
  echo "nvcc_check: $failed of ${#SOURCES[@]} file(s) failed (a compile error, or an umbrella header: see above)" >&2
  exit 1
fi
echo "nvcc_check: all ${#SOURCES[@]} file(s) compiled"
