#!/usr/bin/env bash
# Wheels for a lent GPU machine (Python 3.12, x86-64, no package index there): the serve stage of
# scripts/gpu_run.sh imports FastAPI (which since 0.16x imports opentelemetry-api) and uvicorn, the
# int8 stage torchao; the GPU image has none of them.
# Downloads them into .whl/ (git-ignored, ~6 MB); name ".whl" in the device call's carry and
# gpu_run.sh installs them to /tmp/site before its stages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.13.4 pydantic_core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 opentelemetry-api==1.45.2 torchao==0.18.0
ls .whl
