"""Expert parallelism on this machine: 1 process vs 2 ranks of `mlx.launch --backend ring`.

    python benchmarks/distributed.py --model DIR            an existing checkpoint
    python benchmarks/distributed.py --synth                a synthetic Coder-Next of 2 layers (~2 GB),
                                                            written to a temporary folder and deleted after

For each configuration (ranks x resident/streamed; 2 ranks resident also with the shared expert
on every rank, FOLD_SHARED=False) it launches fresh processes, each loading the model, prefilling
a prompt and timing greedy decode steps. Reported per rank: decode tok/s, CPU time per token, peak RSS, resident
expert bytes, expert bytes read from disk per decode token (streamed), seconds to load and prefill 16 tokens.
Each configuration runs in its own processes, one after the other, so the page cache is shared
between runs (streamed figures are warm-cache figures after the first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [(7 * i + 3) % 1000 for i in range(16)]


def worker(args: argparse.Namespace) -> None:
    """One process (or one rank): load, prefill, time decode steps, write a JSON line."""
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from flashmoe import distributed
    from flashmoe.loader import load_model

    distributed.FOLD_SHARED = not args.no_fold
    group = mx.distributed.init() if args.group else None
    tic = time.perf_counter()
    model = load_model(args.model, stream_experts=args.stream, group=group)
    cache = model.make_cache()
    step = model(mx.array([PROMPT]), cache)[:, -1]
    token = mx.argmax(step, axis=-1)
    mx.eval(token)
    load_s = time.perf_counter() - tic  # load and prefill: one process loads lazily, on the first forward
    for _ in range(args.warmup):
        token = mx.argmax(model(token[None], cache)[:, -1], axis=-1)
        mx.eval(token)
    stats = model.report.stream_stats
    if stats is not None:
        stats.reset()
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.tokens):
        token = mx.argmax(model(token[None], cache)[:, -1], axis=-1)
        mx.eval(token)
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    rank = group.rank() if group is not None else 0
    result = {
        "rank": rank,
        "ranks": group.size() if group is not None else 1,
        "stream": args.stream,
        "fold": not args.no_fold,
        "tok_s": args.tokens / seconds,
        "cpu_ms_per_token": 1e3 * cpu / args.tokens,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "expert_mb": distributed.expert_nbytes(model) / 2**20,
        "read_mb_per_token": (stats.decode.bytes / args.tokens / 2**20) if stats is not None else 0.0,
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def run(model: str, ranks: int, stream: bool, fold: bool, tokens: int, warmup: int) -> list[dict]:
    out = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    command = (
        [
            sys.executable,
            __file__,
            "--worker",
            "--model",
            model,
            "--tokens",
            str(tokens),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
        ]
        + (["--stream"] * stream)
        + (["--no-fold"] * (not fold))
    )
    if ranks > 1:
        launcher = Path(sys.executable).parent / "mlx.launch"
        command = [
            str(launcher if launcher.exists() else "mlx.launch"),
            "-n",
            str(ranks),
            "--backend",
            "ring",
            "--",
            *command[:1],
            *command[1:],
            "--group",
        ]
    # The cores shared out between the ranks: flashmoe's native CPU kernels (FLASHMOE_NATIVE_THREADS) and
    # MLX's BLAS (OpenBLAS threads spin after their work: two processes' spinning threads halve the speed).
    threads = str(max(1, len(os.sched_getaffinity(0)) // ranks))
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        FLASHMOE_NATIVE_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        OMP_NUM_THREADS=threads,
    )
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument(
        "--synth",
        action="store_true",
        help="write (and delete after) a 2-layer synthetic Coder-Next",
    )
    p.add_argument("--tokens", type=int, default=24, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--json", help="append every row to this JSONL file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-fold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.model and not args.synth:
        p.error("pass --model DIR or --synth")
    scratch = tempfile.mkdtemp(prefix="flashmoe-ep-") if args.synth else None
    try:
        model = args.model
        if scratch:
            model = str(Path(scratch) / "coder-next-2l")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "flashmoe.tools.synth",
                    "--preset",
                    "qwen3-coder-next",
                    "--layers",
                    "2",
                    "--out",
                    model,
                ],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
        configs = [
            (1, False, True),
            (2, False, True),
            (2, False, False),
            (1, True, True),
            (2, True, True),
            (2, True, False),
        ]
        print(
            "| ranks | experts | shared expert | rank | decode tok/s | CPU ms/token | peak RSS MB | resident experts MB "
            "| expert MB read/token | load+prefill s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for ranks, stream, fold in configs:
            for r in run(model, ranks, stream, fold, args.tokens, args.warmup):
                shared = "-" if ranks == 1 else ("rank 0, in the all_sum" if fold else "every rank, after")
                print(
                    f"| {ranks} | {'streamed' if stream else 'resident'} | {shared} | {r['rank']} | "
                    f"{r['tok_s']:.2f} | {r['cpu_ms_per_token']:.0f} | {r['peak_rss_mb']:.0f} | {r['expert_mb']:.0f} | "
                    f"{r['read_mb_per_token']:.2f} | {r['load_s']:.1f} |",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(dict(r, model=model)) + "\n")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
