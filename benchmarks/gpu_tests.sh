#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh` (session 5): the whole test suite (notebooks aside:
# no nbmake there), spread over 12 processes (NVRTC compiles are CPU-bound), mlx-lm from the carried
# wheel. Counts and failures in $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
timeout 540 python3 -m pytest -n 12 -q -p no:cacheprovider -rfE --junitxml=$OUT/junit.xml tests/ > $OUT/tests.txt 2>&1
echo "rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.txt | head -30
tail -3 $OUT/tests.txt
