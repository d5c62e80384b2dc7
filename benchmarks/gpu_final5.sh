#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh` (session 5): kernels.py's GPU kernel time in a
# dependent chain, the one-layer MoE comparison (resident and streamed), decode.py on the three
# checkpoints, and --timing for the Coder-Next shape with the tree before the speed work
# (oldtree/: 5020c54^, carried) and today's. Results in $OUT.
source benchmarks/gpu_setup.sh
timeout 80 python3 benchmarks/kernels.py --full --mode device --backends cuda,mlx 2>&1 | tee $OUT/kernels_device.txt
timeout 60 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 --compiled --streamed 2>&1 | tee $OUT/moe.txt
wait
timeout 200 python3 benchmarks/decode.py --models /tmp/q30,/tmp/cn8,bundled --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
for tree in old new; do
  if [ $tree = old ]; then pp=$PWD/oldtree:$PYTHONPATH; else pp=$PYTHONPATH; fi
  echo "== $tree tree: --timing, Coder-Next shape 8 layers" | tee -a $OUT/timing.txt
  # from /tmp: `python -m` puts the working directory (this checkout's flashmoe/) first on sys.path
  (cd /tmp && PYTHONPATH=$pp timeout 60 python3 -m flashmoe --model /tmp/cn8 --prompt "def parse(" --max-tokens 48 \
    --timing 2>&1 | tail -16 | tee -a $OUT/timing.txt)
done
