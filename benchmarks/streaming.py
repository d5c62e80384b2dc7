"""Expert streaming on a checkpoint larger than memory: decode tokens/s cold and warm, bytes, RSS.

    python benchmarks/streaming.py suite --model DIR [--cache-mb 0,2048] [--threads 4] [--json out.json]
    python benchmarks/streaming.py threads --model DIR [--threads 1,2,4,8,16]
    python benchmarks/streaming.py io --model DIR [--threads 8,16] [--tokens 4]   (reads alone, no model)
    python benchmarks/streaming.py trace --model DIR --tokens 40 --trace ids.npy  (record the experts chosen)
    python benchmarks/streaming.py replay --model DIR --trace ids.npy --cache-mb 0,2048,8192   (reads alone)
    python benchmarks/streaming.py mlx-lm --model DIR --limit-gb 16
    python benchmarks/streaming.py run --model DIR [...]      (one measurement; what suite starts)

Each measurement runs in a fresh process, whose peak RSS its parent reads (os.wait4). In it:
load with stream_experts, one throwaway token to bring the non-expert weights in, then

    cold   the checkpoint's pages dropped from the page cache (posix_fadvise(POSIX_FADV_DONTNEED)
           on each of its files, after fsync; /proc/sys/vm/drop_caches needs privileges we lack),
           prefill --prompt tokens, then decode --tokens tokens
    warm   decode --warmup more tokens unmeasured, then --tokens tokens measured

Tokens are fixed random ids fed one at a time (teacher forcing), so every configuration routes
identically and reads the same experts; greedy text from random weights would loop on a few
tokens and flatter every cache. "theory" is K x expert bytes x MoE layers per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe.loader import load_model, read_config
from flashmoe.models.args import ModelArgs
from flashmoe.streaming.experts import StreamOptions
from flashmoe.streaming.layout import open_layout
from flashmoe.streaming.reader import ExpertReader
from flashmoe.streaming.stats import format_stream_stats


def drop_page_cache(directory: Path) -> int:
    """Drop every file of the checkpoint from the page cache; returns the bytes advised."""
    total = 0
    for path in [p for p in directory.rglob("*") if p.is_file()]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def decode(model, cache, ids: np.ndarray) -> float:
    """Feed `ids` one at a time; seconds taken (one sync per token, as generation has)."""
    tic = time.perf_counter()
    for token in ids.tolist():
        mx.eval(model(mx.array([[token]]), cache))
    return time.perf_counter() - tic


def phase(model, seconds: float, tokens: int, kind: str = "decode") -> dict:
    summary = model.report.stream_stats.summary()[kind]
    return dict(
        tokens_per_s=tokens / seconds,
        seconds=seconds,
        **{k: v for k, v in summary.items() if k != "io_ms_per_layer"},
    )


def run(args: argparse.Namespace) -> dict:
    """One measurement (in this process): load, cold prefill + decode, warm decode."""
    directory = Path(args.model)
    options = StreamOptions(expert_cache_mb=args.cache_mb, io_threads=args.threads)
    tic = time.perf_counter()
    model = load_model(directory, stream_experts=options)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, model.args.vocab_size, args.prompt + 2 * args.tokens + args.warmup + 1)
    mx.eval(model(mx.array([[int(ids[-1])]]), model.make_cache()))  # brings the non-expert weights in
    result = dict(
        model=str(directory),
        layout=model.report.stream_stats.layout,
        cache_mb=args.cache_mb,
        threads=args.threads,
        load_s=time.perf_counter() - tic,
        k=model.args.num_experts_per_tok,
        moe_layers=len(model.moe_layers),
        expert_bytes=model.layers[model.moe_layers[0]].mlp.experts.layer.expert_bytes,
    )
    result["dropped_bytes"] = drop_page_cache(directory) if not args.no_drop else 0
    model.report.stream_stats.reset()
    cache = model.make_cache()
    tic = time.perf_counter()
    mx.eval(model(mx.array(ids[None, : args.prompt]), cache))
    result["prefill"] = phase(model, time.perf_counter() - tic, args.prompt, "prefill")
    at = args.prompt
    result["cold"] = phase(model, decode(model, cache, ids[at : at + args.tokens]), args.tokens)
    print(format_stream_stats(model.report.stream_stats), file=sys.stderr)
    at += args.tokens
    if args.warmup >= 0:
        decode(model, cache, ids[at : at + args.warmup])
        model.report.stream_stats.reset()
        at += args.warmup
        result["warm"] = phase(model, decode(model, cache, ids[at : at + args.tokens]), args.tokens)
        print(format_stream_stats(model.report.stream_stats), file=sys.stderr)
    return result


def io_only(model: str, threads: int, tokens: int, seed: int) -> dict:
    """The reads alone, cold: K experts drawn uniformly per MoE layer per token, through ExpertReader."""
    directory = Path(model)
    args = ModelArgs.from_config(read_config(directory))
    layout = open_layout(directory, args)
    reader = ExpertReader(layout.files, threads=threads)
    drop_page_cache(directory)
    rng = np.random.default_rng(seed)
    reads = size = hits = 0
    read_s = upload_s = 0.0
    tic = time.perf_counter()
    for _ in range(tokens):
        for layer in layout.layers.values():
            ids = np.sort(rng.choice(layer.num_experts, args.num_experts_per_tok, replace=False))
            _, report = reader.read(layer, ids)
            reads, size, hits = (
                reads + report.reads,
                size + report.bytes,
                hits + report.page_cache_bytes,
            )
            read_s, upload_s = read_s + report.seconds, upload_s + report.upload_seconds
    seconds = time.perf_counter() - tic
    return dict(
        model=model,
        layout=layout.kind,
        threads=threads,
        tokens=tokens,
        ms_per_token=1e3 * seconds / tokens,
        read_ms_per_token=1e3 * read_s / tokens,
        upload_ms_per_token=1e3 * upload_s / tokens,
        read_gb_per_s=size / read_s / 1e9,
        bytes_per_token=size / tokens,
        reads_per_token=reads / tokens,
        page_cache_hit_rate=hits / size,
    )


def trace(model: str, path: str, prompt: int, tokens: int, seed: int) -> dict:
    """Decode `tokens` tokens and save the experts each MoE layer chose: (tokens, layers, K) ids in `path`."""
    streamed = load_model(model, stream_experts=True)
    ids = np.random.default_rng(seed).integers(0, streamed.args.vocab_size, prompt + tokens)
    cache = streamed.make_cache()
    mx.eval(streamed(mx.array(ids[None, :prompt]), cache))
    steps = []
    for token in ids[prompt:].tolist():
        mx.eval(streamed(mx.array([[token]]), cache))
        steps.append([np.array(r.experts).reshape(-1) for r in streamed.routing().values()])
    np.save(path, np.array(steps, dtype=np.int32))
    return dict(model=model, trace=path, tokens=tokens)


def replay(model: str, path: str, threads: int, cache_mb: float) -> dict:
    """Read a recorded trace twice through ExpertReader, no compute: cold (page cache dropped), then warm."""
    directory = Path(model)
    layout = open_layout(directory, ModelArgs.from_config(read_config(directory)))
    layers = sorted(layout.layers.values(), key=lambda layer: layer.layer)
    steps = np.load(path)  # (tokens, layers, K)
    reader = ExpertReader(layout.files, threads=threads, cache_bytes=int(cache_mb * 2**20))
    drop_page_cache(directory)
    result = dict(model=model, layout=layout.kind, threads=threads, cache_mb=cache_mb, tokens=len(steps))
    for name in ("cold", "warm"):
        totals = dict(bytes=0, hits=0, cached=0, experts=0, seconds=0.0)
        tic = time.perf_counter()
        for step in steps:
            for layer, ids in zip(layers, step):
                _, report = reader.read(layer, np.unique(ids))
                totals["bytes"] += report.bytes
                totals["hits"] += report.page_cache_bytes
                totals["cached"] += report.cached
                totals["experts"] += report.experts
        seconds = time.perf_counter() - tic
        result[name] = dict(
            ms_per_token=1e3 * seconds / len(steps),
            bytes_per_token=totals["bytes"] / len(steps),
            page_cache_hit_rate=totals["hits"] / max(totals["bytes"], 1),
            lru_hit_rate=totals["cached"] / totals["experts"],
        )
    return result


def measure(model: str, **options) -> dict:
    """`run` in a fresh process; adds its peak RSS."""
    argv = [sys.executable, __file__, "run", "--model", model]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9
    return result


def mlx_lm(
    model: str, limit_gb: float, timeout: float, prompt: str = "def fibonacci(n):", tokens: int = 4
) -> dict:
    """mlx-lm's own generate on the same checkpoint, its address space capped with prlimit, killed after `timeout` s."""
    argv = [
        "prlimit",
        f"--as={int(limit_gb * 2**30)}",
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-tokens",
        str(tokens),
    ]
    tic = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        outcome, usage = "exited", None
        while usage is None:
            pid, status, rusage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                usage = rusage
            elif time.perf_counter() - tic > timeout:
                vm = _vm_status(child.pid)  # where it was stuck, before killing it
                child.kill()
                _, status, usage = os.wait4(child.pid, 0)
                outcome = f"no progress after {timeout:.0f} s, killed ({vm})"
            else:
                time.sleep(1)
        log.seek(0)
        out = log.read()
    return dict(
        command=" ".join(argv),
        outcome=outcome,
        exit_status=os.waitstatus_to_exitcode(status),
        seconds=time.perf_counter() - tic,
        peak_rss_gb=usage.ru_maxrss * 1024 / 1e9,
        output_tail=out[-1500:],
    )


def _vm_status(pid: int) -> str:
    """VmPeak, VmRSS and what its threads wait on, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    waits = sorted({Path(t, "wchan").read_text() for t in Path(f"/proc/{pid}/task").iterdir()})
    return f"VmPeak {fields.get('VmPeak')}, VmRSS {fields.get('VmRSS')}, {fields.get('Threads')} threads waiting in {waits}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "suite", "threads", "io", "trace", "replay", "mlx-lm"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache-mb", default="0", help="LRU size in MB (suite: a comma list)")
    parser.add_argument("--threads", default="16", help="I/O threads (threads, io: a comma list)")
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument(
        "--warmup",
        type=int,
        default=48,
        help="unmeasured tokens before the warm run; -1: no warm run",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-drop", action="store_true", help="keep the page cache (not a cold start)")
    parser.add_argument("--limit-gb", type=float, default=16.0, help="mlx-lm: address-space cap")
    parser.add_argument("--timeout", type=float, default=900.0, help="mlx-lm: seconds before it is killed")
    parser.add_argument("--trace", help="trace/replay: the .npy file of recorded expert ids")
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args(argv)
    common = dict(prompt=args.prompt, tokens=args.tokens, seed=args.seed)
    if args.command == "run":
        args.cache_mb, args.threads = float(args.cache_mb), int(args.threads)
        print(json.dumps(run(args)))
        return 0
    if args.command == "suite":
        results = [
            measure(args.model, cache_mb=c, threads=args.threads, warmup=args.warmup, **common)
            for c in args.cache_mb.split(",")
        ]
    elif args.command == "trace":
        results = [trace(args.model, args.trace, args.prompt, args.tokens, args.seed)]
    elif args.command == "replay":
        results = [
            replay(args.model, args.trace, int(args.threads), float(c)) for c in args.cache_mb.split(",")
        ]
    elif args.command == "io":
        results = [io_only(args.model, int(t), args.tokens, args.seed) for t in args.threads.split(",")]
    elif args.command == "threads":
        results = [measure(args.model, threads=t, warmup=-1, **common) for t in args.threads.split(",")]
    else:
        results = [mlx_lm(args.model, args.limit_gb, args.timeout)]
    for result in results:
        print(json.dumps(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"command": args.command, **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
