#!/usr/bin/env bash
# Fill .whl/ with the serve extra and the OpenAI client for the GPU machine (Python 3.12, no internet, none of
# fastapi / uvicorn / openai installed), for benchmarks/serve.py there. The versions are those installed here.
#   bash benchmarks/serve_wheels.sh
# There: carry .whl and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# the serve extra, the client and what they need beyond the GPU image (anyio, idna, typing-extensions there may be
# older than these need, so they travel too)
PKGS="fastapi starlette pydantic pydantic_core typing-inspection annotated-types annotated-doc opentelemetry-api
      uvicorn h11 click openai httpx2 httpcore2 truststore jiter sniffio anyio idna typing-extensions"
rm -rf .whl && mkdir -p .whl
for p in $PKGS; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p==$v"
done
ls .whl | wc -l; du -sh .whl
