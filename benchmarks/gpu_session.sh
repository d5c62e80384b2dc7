#!/bin/bash
# One device session: kernel table, MoE layer, gated delta timing, then tests (used from the `run` tool)
export PYTHONUNBUFFERED=1
python3 benchmarks/kernels.py --backends cuda,mlx --calls 50 --repeats 5 --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.txt
python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 7 2>&1 | tee $OUT/moe.txt
python3 benchmarks/gated_delta_step.py --steps 48 --repeats 7 2>&1 | tee $OUT/gd.txt
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_metal_source.py tests/test_kernels.py -k "not reference and not mlx" 2>&1 | tail -15 | tee $OUT/tests.txt
