#!/bin/bash
# One device session: tests, kernel table, MoE layer, gated delta timing (used from the `run` tool)
set -x
export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_metal_source.py tests/kernels 2>&1 | tail -25 | tee $OUT/tests.txt
python3 benchmarks/kernels.py --calls 50 --repeats 7 --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.txt
python3 benchmarks/moe_layer.py 2>&1 | tee $OUT/moe.txt
python3 benchmarks/gated_delta_step.py 2>&1 | tee $OUT/gd.txt
