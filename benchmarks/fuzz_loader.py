"""Fuzz the loader: random mutations of the bundled checkpoint's safetensors header and bytes.

    python benchmarks/fuzz_loader.py [--seconds 180] [--seed 0] [--timeout 60]

Each mutated copy is loaded in a fresh subprocess (a crash or hang cannot take the fuzzer down) under a
time limit, and its outcome classified:

    refused      a clean FlashMoeError (exit 3, one line)
    same         loaded, logits of a fixed prompt identical to the original's (the mutation was harmless)
    different    loaded, logits differ: a mutation of weight bytes no loader can tell from real weights
    nonfinite    loaded, logits not finite (also undetectable from the file; generate stops on it)
    traceback    another Python exception (a hole in validation)
    crash        killed by a signal (segfault, abort)
    hang         ran past the time limit
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 17, 42, 99, 7]

CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
import mlx.core as mx
from flashmoe.errors import FlashMoeError
try:
    from flashmoe.loader import load_model
    model = load_model(sys.argv[1])
    logits = model(mx.array([%s])[None])
    mx.eval(logits)
    np.save(sys.argv[3], np.asarray(logits.astype(mx.float32)))
except FlashMoeError as e:
    print(str(e).splitlines()[0][:300], file=sys.stderr)
    sys.exit(3)
""" % ", ".join(map(str, PROMPT))  # noqa: UP031 (a code template: braces would clash)


def mutate_header(header: dict, rng: random.Random) -> tuple[dict | bytes, str]:
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(
        [
            "dtype",
            "shape",
            "offsets",
            "delete",
            "duplicate",
            "swap",
            "metadata",
            "type",
            "rename",
            "json_bytes",
        ]
    )
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I64", "F8_E4M3", "X", 5])
    elif kind == "shape":
        shape = list(entry["shape"])
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, -1, shape[i] + 1, shape[i] - 1, shape[i] * 2, 2**62, "8", 1.5])
        else:
            shape = [rng.randint(0, 4)]
        if rng.random() < 0.3:
            shape = shape[::-1]  # a transposed shape of the same size: undetectable from the header alone
        entry["shape"] = shape
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        delta = rng.choice([1, -1, 2, 8, -8, 4096, 2**40, -(2**40)])
        entry["data_offsets"] = rng.choice(
            [
                [begin + delta, end + delta],
                [begin, end + delta],
                [begin + delta, end],
                [end, begin],
                [begin],
                "x",
            ]
        )
    elif kind == "delete":
        del header[name]
    elif kind == "duplicate":
        raw = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        return raw[:-1] + ", " + dup + "}", kind
    elif kind == "swap":
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([5, [], {"format": "pt"}, None, "x"])
    elif kind == "type":
        header[name] = rng.choice([5, [], "x", None, {}])
    elif kind == "rename":
        header[name + rng.choice(["x", ".weight", ""])] = header.pop(name)
    else:
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), kind
    return header, kind


def mutate(source: Path, target: Path, rng: random.Random) -> str:
    data = bytearray(source.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    kind = rng.choice(
        ["header"] * 5 + ["length", "truncate", "append", "flip_data", "flip_any", "zero_data", "nan_data"]
    )
    if kind == "header":
        new, sub = mutate_header(header, rng)
        raw = (
            new
            if isinstance(new, bytes)
            else (new.encode() if isinstance(new, str) else json.dumps(new).encode())
        )
        raw += b" " * (-len(raw) % 8)
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        return f"header.{sub}"
    if kind == "length":
        value = rng.choice([0, 1, length - 1, length + 1, length + 8, 10**12, 2**63, 2**64 - 1, len(data)])
        data[:8] = struct.pack("<Q", value)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "append":
        data += os.urandom(rng.choice([1, 8, 4096]))
    elif kind == "flip_data":
        for _ in range(rng.randint(1, 16)):
            data[8 + length + rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    elif kind == "flip_any":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 8 + length + 64))] ^= 1 << rng.randrange(8)
    elif kind == "zero_data":
        start = 8 + length + rng.randrange(len(body))
        stop = min(len(data), start + rng.choice([2, 64, 4096]))
        data[start:stop] = bytes(stop - start)  # same length: only the values change
    else:  # bf16 NaN / inf bytes in a random spot of the data
        start = 8 + length + 2 * rng.randrange(len(body) // 2)
        data[start : start + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"])
    target.write_bytes(bytes(data))
    return kind


def run_one(folder: Path, reference, timeout: float) -> tuple[str, str]:
    import numpy as np

    out = folder / "logits.npy"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), str(ROOT), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "hang", ""
    if proc.returncode == 3:
        return "refused", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode < 0:
        return "crash", f"signal {-proc.returncode}"
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()]
        return "traceback", last[-1] if last else f"exit {proc.returncode}"
    logits = np.load(out)
    if not np.isfinite(logits).all():
        return "nonfinite", ""
    if reference is None:
        return "same", ""
    same = logits.shape == reference.shape and np.array_equal(logits, reference)
    return ("same" if same else "different"), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one load may take")
    parser.add_argument("--json", help="write the counts and examples here")
    options = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from flashmoe.loader import default_model_dir

    rng = random.Random(options.seed)
    source_dir = default_model_dir()
    shard = next(source_dir.glob("*.safetensors"))
    counts: collections.Counter = collections.Counter()
    by_kind: dict = collections.defaultdict(collections.Counter)
    examples: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(source_dir, folder)
        outcome, _ = run_one(folder, None, options.timeout)
        import numpy as np

        reference = np.load(folder / "logits.npy")
        deadline = time.monotonic() + options.seconds
        while time.monotonic() < deadline:
            kind = mutate(shard, folder / shard.name, rng)
            outcome, detail = run_one(folder, reference, options.timeout)
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            if outcome in ("traceback", "crash", "hang") or outcome not in examples:
                examples.setdefault(outcome, []).append(f"{kind}: {detail}")
        shutil.copy(shard, folder / shard.name)
    total = sum(counts.values())
    print(f"{total} mutations in {options.seconds:.0f} s")
    for outcome in ("refused", "same", "different", "nonfinite", "traceback", "crash", "hang"):
        print(f"  {outcome:10s} {counts[outcome]}")
    for kind in sorted(by_kind):
        print(f"    {kind:18s} {dict(by_kind[kind])}")
    for outcome in ("traceback", "crash", "hang"):
        for example in examples.get(outcome, [])[:5]:
            print(f"  {outcome}: {example}")
    if options.json:
        Path(options.json).write_text(
            json.dumps(dict(counts=counts, by_kind=by_kind, examples=examples), indent=1)
        )
    return 1 if counts["traceback"] or counts["crash"] or counts["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
