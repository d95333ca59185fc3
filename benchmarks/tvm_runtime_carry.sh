#!/usr/bin/env bash
# Build .tvmrt/site/: a runtime-only `tvm` + `tvm_ffi` for the GPU machine's Python (3.12, no TVM installed, no
# internet), small enough to travel as a `run` carry path (backends/tvm/README.md, "Deployment: runtime only").
#   bash benchmarks/tvm_runtime_carry.sh                  # cp312 wheels (pip download) -> .tvmrt/site
#   PYTAG=311 SRC=.venv/lib/python3.11/site-packages DEST=/tmp/rt bash benchmarks/tvm_runtime_carry.sh
#                                                         # same pruning from an installed tree (to test it here)
# There: carry .tvmrt (and .tvmprebuilt) and start with  export PYTHONPATH=$PWD/.tvmrt/site${PYTHONPATH:+:$PYTHONPATH};
# The versions default to those installed here (the modules in .tvmprebuilt were built by them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTAG=${PYTAG:-312}                       # CPython tag of tvm_ffi's compiled extension (core.cpython-$PYTAG-*.so)
SRC=${SRC:-}                              # an installed site-packages to copy from instead of the wheels
DEST=${DEST:-.tvmrt/site}
WHEELS=${WHEELS:-/tmp/tvmwheels}          # download cache: apache-tvm is ~100 MB (its compiler library)
TVM_V=${TVM_V:-$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))')}
FFI_V=${FFI_V:-$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')}

rm -rf "$DEST" && mkdir -p "$DEST"
if [ -n "$SRC" ]; then
    cp -a "$SRC/tvm" "$SRC/tvm_ffi" "$DEST/"
else
    # apache-tvm is py3-none (same files for every Python); apache-tvm-ffi carries a cp$PYTAG extension.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTAG:0:1}.${PYTAG:1}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "apache-tvm==$TVM_V" "apache-tvm-ffi==$FFI_V"
    unzip -q -o "$WHEELS"/apache_tvm-"$TVM_V"-*.whl 'tvm/*' -d "$DEST"
    unzip -q -o "$WHEELS"/apache_tvm_ffi-"$FFI_V"-cp"$PYTAG"-*.whl 'tvm_ffi/*' -d "$DEST"
fi
# No *.dist-info on purpose: tvm_ffi then finds its libraries beside its own files, not through pip metadata.

# tvm: the compiler library (~250 MB) and what only building or developing TVM uses: C++ headers and sources,
# vendored third-party sources, CMake files, the web (JS/wasm) runtime with its tests, type stubs. Every .py stays:
# runtime-only code imports across the package (tvm.support.nvcc -> tvm.target, for the CUDA JIT hook).
T=$DEST/tvm
rm -rf "$T/lib/libtvm_compiler.so" "$T"/{3rdparty,include,src,cmake,lib64,web,README.md}
# tvm_ffi: keep the Python package, core.*.so, lib/ (core.*.so links libtvm_ffi.so AND libtvm_ffi_testing.so) and
# include/dlpack (tvm_ffi's fallback build of its torch DLPack addon needs it, only where torch lacks
# __dlpack_c_exchange_api__); drop the C++ headers, sources, Cython sources and CMake files.
F=$DEST/tvm_ffi
rm -rf "$F"/{3rdparty,src,cython,share,CMakeLists.txt,.gitignore,core.pyi} "$F/include/tvm" "$F"/include/*.h
find "$DEST" \( -name __pycache__ -o -name '*.pyi' \) -prune -exec rm -rf {} +

# What a runtime-only load needs must be there, and the compiler must not.
for f in tvm/lib/libtvm_runtime.so tvm/lib/libtvm_runtime_extra.so tvm/lib/libtvm_runtime_cuda.so \
         tvm/runtime/vm.py tvm/support/nvcc.py tvm_ffi/lib/libtvm_ffi.so tvm_ffi/lib/libtvm_ffi_testing.so; do
    [ -e "$DEST/$f" ] || { echo "missing $DEST/$f" >&2; exit 1; }
done
ls "$F"/core.cpython-"$PYTAG"-*.so > /dev/null
if ls "$T"/lib/*compiler* 2> /dev/null; then echo "the compiler library is still there" >&2; exit 1; fi
du -sh "$DEST"
