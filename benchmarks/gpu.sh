#!/bin/bash
# One device call on the lent NVIDIA GPU host, after `source /tmp/gpu/env.sh` (../shared/GPU.md):
#
#     bash benchmarks/gpu.sh TASK [TASK ...]        e.g.  bash benchmarks/gpu.sh tests decode
#
# Each task writes its output to $OUT (what comes back) and echoes a summary. Budget: a call has
# 10 minutes; the times below are what each took on the H200 in session 6.
#   tests    the whole suite, notebooks aside, 12 processes (~6 min)
#   focus    a pytest selection: PYTEST_ARGS="tests/kernels -k cuda" bash benchmarks/gpu.sh focus
#   nan      gpu_nan_stages.py: MLX's quantized_matmul and gated_delta_update here against the CPU (~2 min)
#   sweep    matvec_sweep.py --mode device: launch shapes by kernel time, table to $OUT (~3 min for 5 shapes)
#   kernels  kernels.py --full --mode device: every kernel next to MLX's, kernel time (~1.5 min)
#   moe      moe_layer.py: one MoE layer, fused against gather_qmm, compiled and streamed (~1 min)
#   moek     moe_kernels.py: kernel time of the fused MoE launches per launch shape, the gathered
#            matvec and gather_qmm beside them
#   decode   decode.py on the 8-layer Qwen3-30B and Coder-Next shapes and the bundled model (~3 min)
#   timing   python -m flashmoe --timing on the Coder-Next shape (~1 min)
#   profile  step_profile.py and kernel_timeline.py on both 8-layer shapes (~2 min)
#   stream   stream_sync.py: the streamed MoE layer taken apart (~40 s)
#   seeds    bf16_seeds.py: the bf16 distance test over 5 checkpoint seeds per architecture (~30 s);
#            SEEDS_ARGS="--apart --models qwen3_next" swaps each kernel family for pure MLX in turn
#   positions bf16_positions.py: the same distances step by step, beside mlx-lm with its prompt fed 1x1
# The 8-layer checkpoints are written in the background by gpu_setup.sh; tasks needing them wait.
export PYTHONUNBUFFERED=1
source benchmarks/gpu_setup.sh
checkpoints_ready() { wait; }
for task in "$@"; do
  echo "== $task"
  case $task in
    tests)
      timeout 420 python3 -m pytest -n 12 -q -p no:cacheprovider -rfE tests/ > $OUT/tests.txt 2>&1
      grep -E "^(FAILED|ERROR)" $OUT/tests.txt | head -30; tail -1 $OUT/tests.txt ;;
    focus)
      timeout 400 python3 -m pytest -n 12 -q -p no:cacheprovider -rfE $PYTEST_ARGS > $OUT/focus.txt 2>&1
      grep -E "^(FAILED|ERROR)" $OUT/focus.txt | head -30; tail -1 $OUT/focus.txt ;;
    nan)
      timeout 200 python3 benchmarks/gpu_nan_stages.py --limit 60 2>&1 | grep -v INFO | tee $OUT/nan_stages.txt ;;
    sweep)
      timeout 420 python3 benchmarks/matvec_sweep.py --mode device --no-moe --calls 20 \
        --shapes ${SWEEP_SHAPES:-4096x4096,16384x4096,5120x2048,2048x4096,128x2048} \
        --json $OUT/sweep.json --table $OUT/launch_table.json 2>&1 | grep -v INFO | tee $OUT/sweep.txt ;;
    kernels)
      timeout 150 python3 benchmarks/kernels.py --full --mode device --backends cuda,mlx \
        --json $OUT/kernels.json 2>&1 | grep -v INFO | tee $OUT/kernels.txt ;;
    moe)
      timeout 90 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 --compiled --streamed \
        2>&1 | tee $OUT/moe.txt ;;
    moek)
      timeout 200 python3 benchmarks/moe_kernels.py --json $OUT/moe_kernels.json 2>&1 | grep -v INFO | tee $OUT/moe_kernels.txt ;;
    decode)
      checkpoints_ready
      timeout 240 python3 benchmarks/decode.py --models /tmp/q30,/tmp/cn8,bundled --runs 3 --tokens 32 \
        2>&1 | grep -v INFO | tee $OUT/decode.txt ;;
    timing)
      checkpoints_ready
      # from /tmp: `python -m` puts the working directory first on sys.path; PYTHONPATH has this tree
      (cd /tmp && timeout 60 python3 -m flashmoe --model /tmp/cn8 --prompt "def parse(" --max-tokens 48 \
        --timing 2>&1 | tail -16 | tee $OUT/timing.txt) ;;
    profile)
      checkpoints_ready
      timeout 120 python3 benchmarks/step_profile.py --model /tmp/q30 --model /tmp/cn8 2>&1 | tee $OUT/profile.txt
      timeout 90 python3 benchmarks/kernel_timeline.py --model /tmp/q30 --model /tmp/cn8 --top 14 \
        --json $OUT/timeline.json > $OUT/timeline.txt 2>&1; tail -30 $OUT/timeline.txt ;;
    stream)
      (cd benchmarks && timeout 120 python3 stream_sync.py --layers 24 --repeats 5 2>&1 | grep -v INFO | tee $OUT/stream_sync.txt) ;;
    seeds)
      timeout 300 python3 benchmarks/bf16_seeds.py --seeds 5 --backend cuda $SEEDS_ARGS 2>&1 | grep -v INFO \
        | tee $OUT/bf16_seeds.txt ;;
    positions)
      timeout 300 python3 benchmarks/bf16_positions.py --seeds 5 --backend cuda 2>&1 | grep -v INFO \
        | tee $OUT/bf16_positions.txt ;;
    *) echo "unknown task $task (see the top of benchmarks/gpu.sh)"; exit 2 ;;
  esac
done
