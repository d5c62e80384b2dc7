#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: bf16 parting from mlx-lm with logit margins, the
# per-kernel device timeline of a decode step on both 8-layer checkpoints, then as many of the
# kernel tests as the call has time for (verbose, so a cut run still lists what passed). In $OUT.
source benchmarks/gpu_setup.sh
timeout 120 python3 benchmarks/bf16_parting.py --backends auto,mlx --steps 32 > $OUT/parting.txt 2>&1
wait
timeout 150 python3 benchmarks/kernel_timeline.py --model /tmp/q30 --model /tmp/cn8 --tokens 16 \
  --json $OUT/timeline.json 2>&1 | tee $OUT/timeline.txt
timeout ${TEST_SECONDS:-200} python3 -m pytest -v -p no:cacheprovider ${TESTS:-tests/kernels} > $OUT/tests.txt 2>&1
grep -c PASSED $OUT/tests.txt; grep -E "FAILED|ERROR" $OUT/tests.txt | head -20; tail -3 $OUT/tests.txt
