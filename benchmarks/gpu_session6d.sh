#!/bin/bash
# H200, session 6, last call (after `source /tmp/gpu/env.sh`): the whole suite (notebooks aside),
# then decode.py on the Qwen3-30B-shaped checkpoint with the launch table swept by kernel time.
source benchmarks/gpu_setup.sh
timeout 390 python3 -m pytest -n 12 -q -p no:cacheprovider -rfE tests/ > $OUT/tests.txt 2>&1
echo "tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.txt | head -30
tail -2 $OUT/tests.txt
wait
timeout 130 python3 benchmarks/decode.py --models /tmp/q30 --runs 3 --tokens 32 2>&1 | grep -v INFO | tee $OUT/decode.txt
