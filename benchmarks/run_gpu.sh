#!/usr/bin/env bash
# GPU runs for the device machine, one phase per call (each fits the 10-minute limit); logs and JSON go to $OUT.
#   bash benchmarks/run_gpu.sh check    # (K=, TESTS=, LIMIT=, SKIP_MOE=1 narrow it) Triton kernel/model tests on CUDA (bf16 included) + the MoE layer bench
#   bash benchmarks/run_gpu.sh attn     # MLA decode / flash prefill bench
#   bash benchmarks/run_gpu.sh dsa      # V3.2: sparse MLA decode (bf16 / FP8 cache), indexer scores (bf16 / FP8), top-k, dense MLA
#   bash benchmarks/run_gpu.sh v4attn   # V4-Flash decode attention (window + CSA top-k / HCA + sink), compressor, masked top-k
#   bash benchmarks/run_gpu.sh mtp      # MTP speculative decoding speedup vs acceptance
#   bash benchmarks/run_gpu.sh v2lite   # (OPS=, BACKENDS=, BATCH=, LIMIT=) dsgraph bench: DeepSeek-V2-Lite full size, whole model
#   bash benchmarks/run_gpu.sh v2liteops  # the same model's op-level rows
#   bash benchmarks/run_gpu.sh gemv     # the decode GEMV template against cuBLAS, with a config sweep
#   bash benchmarks/run_gpu.sh mxfp4    # (ARGS=, LIMIT=) V4-Flash experts: the MXFP4 fused MoE (GPU tests, then vs bf16)
#   bash benchmarks/run_gpu.sh gluon    # (ARGS=, LIMIT=) the Gluon MLA decode experiment against the Triton template
#   bash benchmarks/run_gpu.sh profile  # (MODEL=, BATCH=, LIMIT=, ARGS=) where a triton decode step's time goes, per node
#   bash benchmarks/run_gpu.sh v3ops    # (OPS=, BACKENDS=, LIMIT=) dsgraph bench: DeepSeek-V3 layer shapes
#   bash benchmarks/run_gpu.sh tvm      # (OPS=, BACKENDS=) dsgraph bench with the tvm column, modules prebuilt here
#   bash benchmarks/run_gpu.sh tvmtests # (LIMIT=) the TVM schedules' GPU tests, modules prebuilt here
#   bash benchmarks/run_gpu.sh serve    # (PROMPTS=, LIMIT=) the OpenAI-client serving benchmark, full-size V2-Lite;
#                                       # carry .whl (made here by `bash benchmarks/serve_wheels.sh`)
#   bash benchmarks/run_gpu.sh engine   # (LIMIT=, ARGS=) host vs device time of the serving Engine's steps, cProfile
#   bash benchmarks/run_gpu.sh vl       # (LIMIT=) multimodal TTFT and vision-encoder rows
# The device gets the tree without .git: put DSGRAPH_GIT_COMMIT=<hash of HEAD, written out> in the command so
# the JSON records the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
# passes/ backends/ models/ install under the dsgraph namespace: a plain PYTHONPATH=$PWD cannot import them, and
# the source folder dsgraph/ in the working directory must not shadow the install (PYTHONSAFEPATH: no cwd on sys.path)
export PYTHONSAFEPATH=1
SITE=/tmp/dsgraph-site
[ -d "$SITE/dsgraph" ] || python -m pip install -q --no-deps --no-build-isolation --target "$SITE" . > /dev/null
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" DSGRAPH_CACHE_DIR="${OUT:-/tmp}/cache"
OUT="${OUT:-/tmp/dsgraph-gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name ($limit s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "$name rc=$rc" | tee -a "$OUT/status.txt"; tail -n 25 "$OUT/$name.log"
}
BENCH="python -m dsgraph bench"
case "${1:-}" in
check)
    step tests "${LIMIT:-400}" python -m pytest -q -p no:cacheprovider -ra --tb=short --timeout 150 -k "${K:-not nothing}" \
        ${TESTS:-tests/test_triton_kernels.py tests/test_triton_attention.py tests/test_triton_codegen.py \
        tests/test_triton_backend.py}
    [ -n "${SKIP_MOE:-}" ] || step moe 150 python benchmarks/moe_gpu.py ;;
attn)
    step attention 500 python benchmarks/attention_gpu.py ;;
dsa)
    step dsa "${LIMIT:-500}" python benchmarks/dsa_gpu.py ;;
v4attn)
    step v4attn "${LIMIT:-300}" python benchmarks/v4_attention_gpu.py --sweep ;;
mtp)
    step mtp "${LIMIT:-560}" python benchmarks/mtp_speedup.py --device cuda --backend triton --dtype bf16 ;;
v2lite)
    # one phase fits 10 minutes only with few backends: torch.compile alone spent > 6 min compiling this model
    # a tvm backend in BACKENDS needs .tvmprebuilt and .tvmrt carried (see the tvm phase)
    export PYTHONPATH="$PYTHONPATH:$PWD/.tvmrt/site"
    step v2lite "${LIMIT:-570}" $BENCH deepseek-v2-lite --device cuda --dtype bfloat16 --op "${OPS:-prefill,decode}" \
        --backends "${BACKENDS:-eager,triton,onnx}" --batch "${BATCH:-1,64}" --context 4096 --repeats 10 \
        $( [ -d .tvmprebuilt ] && echo --prebuilt .tvmprebuilt ) \
        --json "$OUT/v2-lite-model${TAG:-}-h100.json" --plot "$OUT/v2-lite-model${TAG:-}-h100.png" ;;
gemv)
    step gemv "${LIMIT:-300}" python benchmarks/gemv_gpu.py ;;
mxfp4)
    step mxfp4-tests 150 python -m pytest -q -p no:cacheprovider -ra --tb=short -m gpu tests/test_triton_mxfp4.py
    step mxfp4 "${LIMIT:-420}" python benchmarks/mxfp4_moe_gpu.py ${ARGS:-} ;;
gluon)
    # a hang (a barrier phase gone wrong) ends at LIMIT; try ARGS="--batch 2 --context 256" first
    step gluon "${LIMIT:-120}" python benchmarks/mla_gluon_gpu.py ${ARGS:-} ;;
profile)
    step profile "${LIMIT:-300}" python benchmarks/profile_decode.py "${MODEL:-deepseek-v2-lite}" --batch "${BATCH:-1,64}" ${ARGS:-} ;;
v2liteops)
    step v2liteops 570 $BENCH deepseek-v2-lite --device cuda --dtype bfloat16 --op moe,mla_decode,rmsnorm,rope \
        --backends eager,torch_compile,triton,onnx --batch 1,64 --context 4096 --repeats 20 \
        --json "$OUT/v2-lite-ops-h100.json" --plot "$OUT/v2-lite-ops-h100.png" ;;
v3ops)
    # the tvm column needs .tvmprebuilt (built here with the same arguments and --prebuild) and .tvmrt carried
    export PYTHONPATH="$PYTHONPATH:$PWD/.tvmrt/site"
    step v3ops "${LIMIT:-570}" $BENCH deepseek-v3 --device cuda --dtype bfloat16 \
        --op "${OPS:-mla_decode,prefill_attention,moe,rmsnorm,rope,fp8_gemm}" \
        --backends "${BACKENDS:-eager,triton,tvm,onnx}" --batch 1,64 --context 4096 --repeats "${REPEATS:-20}" \
        --prebuilt .tvmprebuilt --json "$OUT/v3-layers-h100.json" --plot "$OUT/v3-layers-h100.png" ;;
tvm)
    # TVM on the device is runtime-only. Here, first: build the modules (seconds, no GPU) and the runtime-only
    # tvm + tvm_ffi for the device's Python 3.12, then carry .tvmprebuilt and .tvmrt:
    #   dsgraph bench deepseek-v2-lite --device cuda --dtype bfloat16 --op mla_decode,moe,decode --batch 1,64 \
    #       --context 4096 --prebuild .tvmprebuilt
    #   bash benchmarks/tvm_runtime_carry.sh
    export PYTHONPATH="$PYTHONPATH:$PWD/.tvmrt/site"
    step tvm 570 $BENCH deepseek-v2-lite --device cuda --dtype bfloat16 --op "${OPS:-mla_decode,moe,decode}" \
        --backends "${BACKENDS:-eager,triton,tvm}" --batch 1,64 --context 4096 --repeats 10 --prebuilt .tvmprebuilt \
        --json "$OUT/v2-lite-tvm-h100.json" --plot "$OUT/v2-lite-tvm-h100.png" ;;
tvmtests)
    # the TVM schedules' GPU tests (dense GEMV dispatch, grouped GEMM, split-KV MLA) on modules built here by
    #   for t in schedule moe mla; do python tests/test_tvm_$t.py .tvmprebuilt-tests; done
    # carry .tvmrt and .tvmprebuilt-tests
    export PYTHONPATH="$PYTHONPATH:$PWD/.tvmrt/site" DSGRAPH_TVM_PREBUILT=$PWD/.tvmprebuilt-tests
    step tvmtests "${LIMIT:-300}" python -m pytest -m gpu -p no:cacheprovider -q tests/test_tvm_schedule.py \
        tests/test_tvm_moe.py tests/test_tvm_mla.py ;;
serve)
    # the GPU image has no fastapi / uvicorn / openai: install the carried wheels after the dsgraph site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/serve-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/serve-site"
    step serve "${LIMIT:-470}" python benchmarks/serve.py deepseek-v2-lite --device cuda --backend triton \
        --dtype bfloat16 --concurrency 1,16,64 --prompts "${PROMPTS:-8,64,128}" --input-len 1024 --output-len 256 ;;
engine)
    step engine "${LIMIT:-300}" python benchmarks/engine_profile.py deepseek-v2-lite --device cuda --backend triton \
        --dtype bfloat16 --requests 64 --input-len 1024 --output-len 64 ${ARGS:-} ;;
vl)
    step vl "${LIMIT:-300}" python benchmarks/vl_gpu.py --device cuda --dtype bf16 --backends eager,triton ;;
*) echo "usage: $0 check|attn|mtp|gemv|mxfp4|gluon|profile|v2lite|v2liteops|v3ops|tvm|tvmtests|serve|engine|vl" >&2; exit 2 ;;
esac
