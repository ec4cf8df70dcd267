#!/usr/bin/env bash
# One prepared benchmark for a lent single GPU (H100-class, 80 GB), about 6-8 minutes, one JSON file:
# bagel-mid and a BAGEL-7B-shaped slice in bf16 — SFT step time, MFU and peak memory (full vs LoRA,
# gradient checkpointing on/off, SDPA / flash-attn), GRPO rollout images/s (G 8, 15 steps, CFG 4) and
# update time. Details: benchmarks/gpu.py and benchmarks/README.md.
#
#   bash benchmarks/gpu.sh [--out FILE] [--budget SECONDS] [--image-size PX] [--only SUBSTRING]
#   bash benchmarks/gpu.sh --smoke      # tiny cards on the CPU in under a minute (run by the test suite)
#
# Runs from a checkout: src/ is put on PYTHONPATH; PYTHON chooses the interpreter (default: python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu.py" "$@"
