#!/bin/bash
# One H200 session (run from the repository root through the device tool, after `source /tmp/gpu/env.sh`):
# GPU tests, the decode benchmark, --timing (before/after when an older tree is carried as .gpuold),
# and the kernel tables. Everything lands in $OUT.
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/device.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/kernels tests/models tests/test_misread.py \
  tests/streaming/test_streaming.py 2>&1 | tail -15 | tee $OUT/tests.txt
wait
timeout 240 python3 benchmarks/decode.py --models bundled,/tmp/cn8,/tmp/q30 --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
P="def fibonacci(n):"
timeout 60 python3 -m flashmoe --model /tmp/cn8 --prompt "$P" --max-tokens 24 --timing > $OUT/timing_after.txt 2>&1
if [ -d .gpuold ]; then  # an older flashmoe tree (carried as .gpuold) for a before/after comparison
  (cd .gpuold && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m flashmoe --model /tmp/cn8 --prompt "$P" --max-tokens 24 --timing) > $OUT/timing_before.txt 2>&1
fi
timeout 90 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 7 2>&1 | tee $OUT/moe.txt
timeout 60 python3 benchmarks/kernels.py --backends cuda,mlx --calls 50 --repeats 5 2>&1 | tee $OUT/kernels.txt
