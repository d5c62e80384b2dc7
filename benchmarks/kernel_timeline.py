"""What the GPU does during a decode step: every kernel's device time, per engine (NVIDIA only).

    python benchmarks/kernel_timeline.py --model DIR [--tokens 16] [--top 25] [--json FILE]

Runs the greedy decode loop (decode.py's, pipelined) of flashmoe and mlx-lm on one checkpoint
under CUPTI tracing (PyTorch's profiler, which records every kernel of the process, MLX's
included), then reports per token: wall time, the sum of kernel durations, the time the GPU was
busy (union of kernel intervals), kernel launches, and the kernels that cost most. Busy time near
wall time means the step is bound by the device; far below it, by the host (graph building,
encoding, launch latency).

Needs torch with CUDA in the process (on the H200 host: /opt/torch/.venv's site-packages,
appended to sys.path here when present).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from flashmoe.analysis.parity import greedy_decode, mlx_lm_cache, mlx_lm_model
from flashmoe.loader import load_model

PROMPT = [11, 23, 5, 87, 42, 7, 19, 3]


def import_torch():
    for site in glob.glob("/opt/torch/.venv/lib/python3*/site-packages"):
        if site not in sys.path:
            sys.path.append(site)
    import torch  # noqa: F401  (only its profiler is used)
    from torch.profiler import ProfilerActivity, profile

    return profile, ProfilerActivity


def traced_decode(model, make_cache, tokens: int, profile, activity) -> tuple[float, list[dict]]:
    """(wall seconds for `tokens` pipelined greedy tokens, the kernel events recorded meanwhile)."""
    loop = greedy_decode(model, make_cache, PROMPT, tokens + 4)
    for _ in range(4):  # compile, allocate, fill the pipeline
        next(loop)
    with profile(activities=[activity.CUDA]) as prof:
        tic = time.perf_counter()
        for _ in loop:
            pass
        mx.synchronize()
        wall = time.perf_counter() - tic
    return wall, kernel_events(prof)


def kernel_events(prof) -> list[dict]:
    """The device-side events (kernels, copies, memsets) a finished torch profiler recorded."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def summarize(name: str, wall: float, events: list[dict], tokens: int, top: int) -> dict:
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # union of intervals, microseconds
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    total = sum(e["dur"] for e in events)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_name[e["name"][:90]].append(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    row = {
        "engine": name,
        "wall_us_per_token": wall * 1e6 / tokens,
        "busy_us_per_token": busy / tokens,
        "kernel_us_per_token": total / tokens,
        "launches_per_token": len(events) / tokens,
        "kernels": [
            {
                "name": k,
                "per_token": len(v) / tokens,
                "us_per_token": sum(v) / tokens,
                "median_us": statistics.median(v),
            }
            for k, v in ranked
        ],
    }
    print(
        f"{name:<9} wall {row['wall_us_per_token']:8.1f} us/token  GPU busy {row['busy_us_per_token']:8.1f}"
        f" ({row['busy_us_per_token'] / row['wall_us_per_token']:.0%})  kernel sum "
        f"{row['kernel_us_per_token']:8.1f}  launches {row['launches_per_token']:.1f}/token"
    )
    print(f"   {'us/token':>9} {'per token':>9} {'median us':>9}  kernel")
    for k in row["kernels"][:top]:
        print(f"   {k['us_per_token']:9.1f} {k['per_token']:9.1f} {k['median_us']:9.2f}  {k['name']}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="checkpoint directory (repeatable)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--engines", default="flashmoe,mlx-lm")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args(argv)
    try:
        profile, activity = import_torch()
    except ImportError as exc:
        print(f"no torch profiler in this process ({exc}): nothing to trace")
        return 1
    rows = []
    for directory in args.model:
        print(f"\n{directory}: {args.tokens} tokens, device {mx.default_device()}")
        engines = {}
        if "flashmoe" in args.engines:
            engines["flashmoe"] = ((m := load_model(directory)), m.make_cache)
        if "mlx-lm" in args.engines:
            engines["mlx-lm"] = ((r := mlx_lm_model(Path(directory), dtype=None)), mlx_lm_cache(r))
        for name, (model, make_cache) in engines.items():
            wall, events = traced_decode(model, make_cache, args.tokens, profile, activity)
            rows.append(dict(summarize(name, wall, events, args.tokens, args.top), model=directory))
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
