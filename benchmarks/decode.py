"""Decode speed: flashmoe against mlx-lm on the same checkpoint, in one process, interleaved.

    python benchmarks/decode.py [--models bundled,qwen3-coder-next] [--layers 8] [--runs 5] [--tokens 32]

Checkpoints: `bundled` (the default model), a checkpoint directory, or any `flashmoe.tools.synth`
preset, written on the fly at `--layers` layers into a temporary folder and deleted after. Precision is matched: on CPU both
engines compute in float32 (mlx-lm's parameters cast), on a GPU both run the checkpoint's bf16.
For each engine: greedy decode tokens/s (median of `--runs` interleaved runs, with min-max), the
weight bytes a decode step reads (non-expert weights + K/E of the expert stacks, from the headers),
the GB/s that makes and its share of this machine's measured bandwidth, and flashmoe / mlx-lm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.bench import measure_bandwidth, weight_bytes_per_token
from flashmoe.analysis.parity import greedy_tokens_per_second, mlx_lm_cache, mlx_lm_model
from flashmoe.kernels import gpu
from flashmoe.loader import default_model_dir, load_model
from flashmoe.tools.synth import PRESETS, write_synthetic

ON_GPU = mx.default_device() == mx.gpu
DEFAULT_MODELS = (
    "bundled,qwen3-coder-next,qwen3-30b-a3b" if ON_GPU else "bundled,qwen3-moe-small,qwen3-coder-next"
)
PROMPT = [11, 23, 5, 87, 42, 7, 19, 3]  # ids valid in every vocabulary here


@contextmanager
def checkpoint(name: str, layers: int):
    """The checkpoint's directory; synthetic ones are written now and deleted after."""
    if name == "bundled":
        yield default_model_dir(), name
        return
    if Path(name).is_dir():  # a checkpoint directory, used as it is
        yield Path(name), Path(name).name
        return
    if name not in PRESETS:
        raise SystemExit(f"unknown model {name!r}: 'bundled' or one of {sorted(PRESETS)}")
    with tempfile.TemporaryDirectory(prefix="flashmoe-decode-") as tmp:
        write_synthetic(name, tmp, layers=layers, log=lambda _: None)
        yield Path(tmp), f"{name} ({layers} layers)"


def measure(directory: Path, backend: str, runs: int, tokens: int) -> dict[str, list[float]]:
    """tokens/s samples per engine, the two engines alternating run by run."""
    engines = {
        "flashmoe": (model := load_model(directory, backend=backend), model.make_cache),
        "mlx-lm": (
            ref := mlx_lm_model(directory, dtype=None if ON_GPU else mx.float32),
            mlx_lm_cache(ref),
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for run in range(runs):
        order = list(engines) if run % 2 == 0 else list(reversed(engines))
        for name in order:
            model, make_cache = engines[name]
            samples[name].append(greedy_tokens_per_second(model, make_cache, PROMPT, tokens))
    return samples


def report(
    label: str, samples: dict[str, list[float]], per_token: dict[str, float], bandwidth: float
) -> None:
    print(
        f"\n{label}: {per_token['total'] / 1e6:.1f} MB of weights read per token "
        f"({per_token['dense'] / 1e6:.1f} dense + {per_token['experts'] / 1e6:.1f} experts)"
    )
    print(f"{'engine':<10}{'tok/s':>9}{'min':>9}{'max':>9}{'GB/s':>8}{'of bw':>8}")
    medians = {}
    for name, values in samples.items():
        medians[name] = med = statistics.median(values)
        gbs = med * per_token["total"] / 1e9
        print(
            f"{name:<10}{med:>9.2f}{min(values):>9.2f}{max(values):>9.2f}{gbs:>8.2f}{gbs / bandwidth:>8.1%}"
        )
    print(f"flashmoe / mlx-lm: {medians['flashmoe'] / medians['mlx-lm']:.2f}x (medians)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"comma-separated (default: {DEFAULT_MODELS})"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="layers of synthetic checkpoints (GPU 8, CPU 4)"
    )
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per engine (default: 5)")
    parser.add_argument("--tokens", type=int, default=32 if ON_GPU else 8, help="tokens decoded per run")
    parser.add_argument("--backend", default="auto", help="flashmoe's kernel backend (default: auto)")
    args = parser.parse_args(argv)
    layers = args.layers or (8 if ON_GPU else 4)
    bandwidth = measure_bandwidth(256)
    print(
        f"device {mx.default_device()}, flashmoe backend {kernels.resolve_backend(args.backend)}, "
        f"dtype {'bf16 (as stored)' if ON_GPU else 'float32'}, measured bandwidth {bandwidth:.1f} GB/s"
    )
    if ON_GPU:
        print(f"GPU launch table: {len(gpu.launch_table())} measured shapes for {gpu.device_name()!r}")
    for name in args.models.split(","):
        with checkpoint(name.strip(), layers) as (directory, label):
            samples = measure(directory, args.backend, args.runs, args.tokens)
            report(label, samples, weight_bytes_per_token(directory), bandwidth)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
