"""Gated DeltaNet decode step (T = 1, Qwen3-Coder-Next heads): one-launch kernel vs the pure-MLX path.

python benchmarks/gated_delta_step.py [--steps 48] [--repeats 9]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.bench import interleaved, print_speedups, seconds_per_call
from flashmoe.analysis.parity import rel_err
from flashmoe.kernels import gated_delta

N_K, N_V, D_K, D_V, W = 16, 32, 128, 128, 4


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    backend = next((b for b in ("metal", "cuda") if kernels.backend_available(b)), "reference")
    B, C = args.batch, 2 * N_K * D_K + N_V * D_V
    r, bf = mx.random, mx.bfloat16
    fixed = dict(
        conv_w=(0.5 * r.normal((W, C))).astype(bf),
        z=r.normal((B, N_V, D_V)).astype(bf),
        b=r.normal((B, N_V)).astype(bf),
        a=r.normal((B, N_V)).astype(bf),
        A_log=r.uniform(-1, 1, (N_V,)),
        dt_bias=r.normal((N_V,)),
        norm_w=mx.ones((D_V,), dtype=bf),
    )
    qkvs = [r.normal((B, C)).astype(bf) for _ in range(8)]
    dims = dict(n_k=N_K, n_v=N_V, d_k=D_K, d_v=D_V, rms_eps=1e-6)

    def run(fn):
        state, conv, outs = mx.zeros((B, N_V, D_V, D_K)), mx.zeros((B, W - 1, C), dtype=bf), []
        for i in range(args.steps):
            out, state, conv = fn(qkv=qkvs[i % 8], conv_state=conv, state=state, **fixed, **dims)
            outs.append(out)
        return outs + [state]

    paths = {
        "pure MLX (reference)": gated_delta.reference,
        f"kernel ({backend})": lambda **kw: gated_delta.gated_delta_step(**kw, backend=backend),
    }
    res = {k: run(f) for k, f in paths.items()}
    mx.eval(res)
    a, b = list(res.values())
    err = max(rel_err(y, x) for x, y in zip(a, b))
    # microseconds per step, the two paths timed in turns (A, B, B, A...)
    samples = interleaved(
        {k: lambda f=f: 1e6 * seconds_per_call(lambda: run(f)) / args.steps for k, f in paths.items()},
        repeats=args.repeats,
    )
    print(
        f"gated delta step B={B} H_k={N_K} H_v={N_V} d={D_K}, bf16, {args.steps} chained steps per eval; "
        f"max rel diff over steps {err:.2e}"
    )
    print_speedups(samples, "pure MLX (reference)", "us/step")


if __name__ == "__main__":
    main()
