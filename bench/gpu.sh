#!/usr/bin/env bash
# One prepared GPU run (see bench/gpu.py and BENCHMARKS.md): CUDA tests, tokens/s against
# pytorch/examples, a budgeted WikiText-2 quality run; everything into one JSON file.
#   python bench/gpu.py --stage     # first, on the CPU side
#   bench/gpu.sh --dry-run          # anywhere: would it find everything?
#   bench/gpu.sh [--out gpu_result.json]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu.py "$@"
