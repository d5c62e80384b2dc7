#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh` (session 4): the greedy-pick kernel's tests and the
# model's cuda path against the reference backend and mlx-lm, decode.py on the three checkpoints,
# the one-layer MoE comparison, kernels.py. Results in $OUT.
source benchmarks/gpu_setup.sh
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_greedy_pick.py -k cuda > $OUT/tests.txt 2>&1
tail -1 $OUT/tests.txt
timeout 170 python3 -m pytest -v -p no:cacheprovider tests/models/test_gpu_path.py >> $OUT/tests.txt 2>&1
echo "tests: $(grep -c PASSED $OUT/tests.txt) passed, $(grep -c FAILED $OUT/tests.txt) failed"
grep -E "^E .*(Error|vs)" $OUT/tests.txt | head -6; tail -1 $OUT/tests.txt
wait
timeout 240 python3 benchmarks/decode.py --models /tmp/q30,/tmp/cn8,bundled --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
timeout 40 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 2>&1 | tee $OUT/moe.txt
