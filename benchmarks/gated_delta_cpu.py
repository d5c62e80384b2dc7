"""The Gated DeltaNet on the CPU: the native recurrence and step against mx.fast.gated_delta_update.

    python benchmarks/gated_delta_cpu.py [--model DIR] [--repeats 7] [--tokens 32]

1. The recurrence alone, one decode token at Qwen3-Coder-Next's heads (16 key, 32 value heads of
   128 x 128, float32 state of 2 MiB read and written): median ms per call, spread, GB/s of state;
   then the whole decode step after the projections, native kernel against MLX's ops.
2. With --model (a hybrid checkpoint, e.g. `python -m flashmoe.tools.synth --preset qwen3-coder-next
   --layers 4 --out /tmp/cn4`): greedy decode tok/s of the whole model on the native backend, a decode
   token's linear attention through MLX's ops (mx.fast op), those ops with the native recurrence, or
   the native step (conv to gated norm in one primitive), runs interleaved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe.analysis.bench import interleaved, print_speedups, seconds_per_call  # noqa: E402
from flashmoe.analysis.parity import greedy_tokens_per_second  # noqa: E402
from flashmoe.kernels import gated_delta, native  # noqa: E402
from flashmoe.loader import load_model  # noqa: E402
from flashmoe.models import gated_delta as model_gated_delta  # noqa: E402

B, HK, HV, DK, DV = 1, 16, 32, 128, 128


def recurrence_alone(repeats: int) -> None:
    r = mx.random
    q, k = r.normal((B, 1, HK, DK)) * DK**-0.5, r.normal((B, 1, HK, DK)) * DK**-0.5
    v, g, beta = r.normal((B, 1, HV, DV)), r.uniform(0.5, 1, (B, 1, HV)), r.uniform(0, 1, (B, 1, HV))
    state = r.normal((B, HV, DV, DK))
    mx.eval(q, k, v, g, beta, state)
    samples = interleaved(
        {
            "mx.fast.gated_delta_update": lambda: seconds_per_call(
                lambda: mx.fast.gated_delta_update(q, k, v, g, beta, state), number=20
            ),
            "native": lambda: seconds_per_call(
                lambda: native.gated_delta_update(q, k, v, g, beta, state), number=20
            ),
        },
        repeats=repeats,
    )
    ms = {name: [1e3 * s for s in values] for name, values in samples.items()}
    print(f"recurrence alone, B={B} T=1, {HK} key / {HV} value heads of {DK} x {DV}, float32:")
    print_speedups(ms, "mx.fast.gated_delta_update", "ms")
    state_bytes = 2 * state.nbytes  # read and written
    for name, values in ms.items():
        median = sorted(values)[len(values) // 2]
        print(f"  {name}: {state_bytes / (median * 1e-3) / 1e9:.1f} GB/s of state")


def step_alone(repeats: int) -> None:
    """A decode token's whole layer after its projections: the native kernel against the same math in
    MLX's ops (kernels.gated_delta.reference, what the model's lines compute)."""
    r, W, C = mx.random, 4, 2 * HK * DK + HV * DV
    args = dict(
        qkv=r.normal((B, C)),
        conv_state=r.normal((B, W - 1, C)),
        conv_w=0.5 * r.normal((W, C)),
        z=r.normal((B, HV, DV)),
        b=r.normal((B, HV)),
        a=r.normal((B, HV)),
        A_log=r.uniform(-1, 1, (HV,)),
        dt_bias=r.normal((HV,)),
        norm_w=1 + 0.1 * r.normal((DV,)),
        state=0.1 * r.normal((B, HV, DV, DK)),
    )
    mx.eval(args)
    dims = dict(n_k=HK, n_v=HV, d_k=DK, d_v=DV, rms_eps=1e-6)
    step = dict(dims, backend="native")
    samples = interleaved(
        {
            "MLX ops": lambda: seconds_per_call(lambda: gated_delta.reference(**args, **dims), number=20),
            "native step": lambda: seconds_per_call(
                lambda: gated_delta.gated_delta_step(**args, **step), number=20
            ),
        },
        repeats=repeats,
    )
    print("\nthe decode step alone (conv to gated norm), same heads, float32:")
    print_speedups({name: [1e3 * s for s in values] for name, values in samples.items()}, "MLX ops", "ms")


def whole_model(directory: str, repeats: int, tokens: int) -> None:
    model = load_model(directory)
    print(f"\n{directory}: backend {model.report.backend}, {model.report.dtype}")
    native_recurrence, step_runs = model_gated_delta.recurrence, model_gated_delta.native_step_runs

    def mlx_op(q, k, v, decay, beta, state, *, backend):
        return gated_delta.recurrence(q, k, v, decay, beta, state, backend="mlx")

    def variant(recurrence, step: bool):
        def run():
            model_gated_delta.recurrence = recurrence
            model_gated_delta.native_step_runs = step_runs if step else (lambda backend, dtype: False)
            try:
                return greedy_tokens_per_second(model, model.make_cache, [1, 17, 42, 99, 3], tokens)
            finally:
                model_gated_delta.recurrence, model_gated_delta.native_step_runs = (
                    native_recurrence,
                    step_runs,
                )

        return run

    rates = interleaved(
        {
            "mx.fast op": variant(mlx_op, step=False),
            "native recurrence": variant(native_recurrence, step=False),
            "native step": variant(native_recurrence, step=True),
        },
        repeats,
    )
    base = sorted(rates["mx.fast op"])[repeats // 2]
    for name, values in rates.items():
        s = sorted(values)
        print(
            f"{name:>17}: {s[len(s) // 2]:7.2f} tok/s (min {s[0]:.2f}, max {s[-1]:.2f})  {s[len(s) // 2] / base:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.why_unavailable()}")
    print(f"mlx {mx.__version__}, {mx.default_device()}, native {native.info()}")
    recurrence_alone(args.repeats)
    step_alone(args.repeats)
    if args.model:
        whole_model(args.model, args.repeats, args.tokens)


if __name__ == "__main__":
    main()
