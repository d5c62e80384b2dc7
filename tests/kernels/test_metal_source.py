"""Every kernel body as MLX's metal_kernel would assemble it, read by g++ through a small MSL shim
(tests/shims/metal_as_cpp.h). Metal cannot run on Linux; this catches typos in prelude.metal and in the
common bodies before the Apple Silicon workflow (.github/workflows/metal.yml) compiles and runs them.
The argument names are the launchers' own (kernels.gpu, kernels.moe, kernels.gated_delta)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flashmoe.kernels import attention, gated_delta, gpu, moe

SHIM = Path(__file__).resolve().parents[1] / "shims" / "metal_as_cpp.h"
ATTRS = (
    "uint thread_index_in_simdgroup, uint simdgroup_index_in_threadgroup, "
    "uint thread_index_in_threadgroup, uint3 threadgroup_position_in_grid"
)
IN_F, IN_U, IN_I, OUT_F = (
    "const device float*",
    "const device uint32_t*",
    "const device int32_t*",
    "device float*",
)
UINT_INPUTS = {
    "w",
    "gw",
    "uw",
    "sw",
    "idx",
    "ids",
}  # packed words and expert ids; dims, length int32; the rest float
OUT_U = "device uint32_t*"


def arguments(inputs, outputs) -> list[tuple[str, str]]:
    """(name, MSL type) of a kernel's parameters, inputs in the launcher's order, then outputs."""
    kind = {**{n: IN_U for n in UINT_INPUTS}, "dims": IN_I, "length": IN_I, "pos": IN_I}
    return [(n, kind.get(n, IN_F)) for n in inputs] + [
        (n, OUT_U if n in ("ids", "rid") else OUT_F) for n in outputs
    ]


GATE_UP_PARAMS = "typename T, int BITS, int GROUP_SIZE, int RPS, int NORM, int SIMDS, int LPR, int VEC, int U, int TILE, int XD"
GATE_UP_INSTANCES = [
    "float, {bits}, 64, 1, 1, 8, 32, 4, 2, 2048, 0",
    "float, {bits}, 64, 1, 0, 8, 32, 4, 2, 2048, 1",
]
ROUTED_PARAMS = (
    "typename T, int BITS, int GROUP_SIZE, int RPS, int NORM, typename OUT_T, int EPL, int K, int RENORM, "
    "int SIMDS, int LPR, int VEC, int U, int TILE, int XD"
)
ROUTED_INSTANCES = [
    "float, {bits}, 64, 1, 1, float, 16, 10, 1, 8, 32, 4, 2, 2048, 0",
    "float, {bits}, 64, 1, 0, float, 4, 8, 0, 8, 32, 4, 2, 2048, 1",
]
DOWN_PARAMS = "typename T, int BITS, int GROUP_SIZE, int K, int RES, int SIMDS, int LPR, int VEC, int U, int TILE, int XD"
DOWN_INSTANCES = [
    "float, {bits}, 64, 10, 0, 8, 16, 4, 1, 768, 0",
    "float, {bits}, 64, 10, 1, 8, 16, 4, 1, 768, 1",
]

KERNELS = {
    "dequant_matvec.inc": (
        "typename T, int BITS, int GROUP_SIZE, int SIMDS, int RPS, int UNROLL, int TILE, int RES, int NORM, "
        "int OUT_DIM, int IN_DIM, int X_DIV, int GATHER",
        arguments(gpu.INPUT_NAMES, ["y"]),
        [
            "float, {bits}, 64, 8, 2, 4 | 5 << 4 | 1 << 8, 4096, 0, 1, 5120, 2048, 1, 0",
            "float, {bits}, 32, 8, 1, 2 | 2 << 4, 96, 1, 0, 96, 96, 1, 1",
            "float, {bits}, 64, 4, 4, 2 | 5 << 4 | 1 << 8 | 1 << 9, 2048, 1, 1, 512, 2048, 10, 1",
        ],
    ),
    # the MoE bodies' forms share template parameters and instances; each form has its own inputs
    **{
        "moe_gate_up.inc" + form: (GATE_UP_PARAMS, arguments(inputs, ["y"]), GATE_UP_INSTANCES)
        for form, inputs in (("", moe.GATE_UP_INPUTS), (" FM_SHARED_EXPERT", moe.GATE_UP_SHARED_INPUTS))
    },
    **{  # the routed form: moe_route.inc's core, then the gate/up kernel
        "moe_gate_up.inc FM_ROUTED" + form: (
            ROUTED_PARAMS,
            arguments(inputs, moe.ROUTED_OUTPUTS),
            ROUTED_INSTANCES,
        )
        for form, inputs in (("", moe.ROUTED_INPUTS), (" FM_SHARED_EXPERT", moe.ROUTED_SHARED_INPUTS))
    },
    **{
        "moe_down.inc" + form: (DOWN_PARAMS, arguments(inputs, ["y"]), DOWN_INSTANCES)
        for form, inputs in (("", moe.DOWN_INPUTS), (" FM_SHARED_EXPERT", moe.DOWN_SHARED_INPUTS))
    },
    "gated_delta_step.inc": (
        "typename T, int DK, int DV, int W, int HV, int HK, int SIMDS, int LAYOUT, "
        "int QKV_ROW, int QKV_OFF, int Z_ROW, int Z_OFF, int B_ROW, int B_OFF, int A_ROW, int A_OFF",
        arguments(gated_delta.INPUTS, gated_delta.OUTPUTS),
        [
            "float, 128, 128, 4, 32, 16, 8, 0, 8192, 0, 4096, 0, 32, 0, 32, 0",
            "float, 128, 128, 4, 32, 16, 8, 1, 12352, 0, 12352, 0, 12352, 12288, 12352, 12288",
        ],
    ),
    "attention_decode.inc": (
        "typename T, int HD, int SIMDS, int GATED",
        arguments(attention.INPUTS, ["y"]),
        ["float, 128, 4, 0", "float, 64, 8, 1"],
    ),
    "qk_norm_rope.inc": (
        "typename T, int HD, int QW, int ROPE_DIMS, int TRADITIONAL, int NORM, int NQ, int NK, int BATCH, "
        "int Q_ROW, int Q_OFF, int K_ROW, int K_OFF, int V_ROW, int V_OFF",
        arguments(attention.NORM_ROPE_INPUTS, attention.NORM_ROPE_OUTPUTS),
        [
            "float, 128, 128, 128, 0, 1, 32, 4, 1, 5120, 0, 5120, 4096, 5120, 4608",
            "float, 256, 512, 64, 1, 1, 16, 2, 2, 8192, 0, 512, 0, 512, 0",
            "float, 64, 64, 64, 0, 0, 4, 4, 1, 768, 0, 768, 256, 768, 512",
        ],
    ),
    "greedy_pick.inc": (
        "typename T, int THREADS",
        [("logits", IN_F), ("dims", IN_I), ("out", "device int32_t*")],
        ["float, 1024", "float, 256"],
    ),
    "embed_rows.inc": (
        "typename T, int BITS, int GROUP_SIZE, int D, int V, int THREADS",
        [("tokens", IN_I), ("w", IN_U), ("scales", IN_F), ("biases", IN_F), ("y", OUT_F)],
        ["float, {bits}, 64, 2048, 151936, 256", "float, {bits}, 128, 512, 100, 256"],
    ),
    "moe_route.inc": (
        "typename T, typename OUT_T, int EPL, int K, int RENORM",
        arguments(moe.ROUTE_INPUTS, moe.ROUTE_OUTPUTS),
        ["float, float, 16, 10, 1", "float, float, 2, 4, 0"],
    ),
}


def compose_args(key: str) -> tuple[str, tuple[str, ...]]:
    """A KERNELS key as gpu.compose's arguments: "body.inc" or "body.inc DEFINE ..." (a body's #if form)."""
    body, *defines = key.split()
    return body, tuple(defines)


def translation_unit(
    backend: str, key: str, bits: int, *, opening: str, qualifier="", type_of=str, attrs=("", ""), extra=()
) -> str:
    """KERNELS[key]'s body as `backend`'s launcher composes it, wrapped in a template function kern
    (`qualifier` kern, parameters typed by type_of(MSL type) plus attrs[0]) instantiated for each of its
    instances at `bits` and for the `extra` ones, after `opening` (the includes)."""
    tparams, args, instances = KERNELS[key]
    header, text = gpu.compose(backend, *compose_args(key))
    assert gpu.CORE_MARKER not in text
    params = ", ".join(f"{type_of(t)} {n}" for n, t in args) + attrs[0]
    types = ", ".join(type_of(t) for _, t in args) + attrs[1]
    lines = [opening, header, f"template <{tparams}>\n{qualifier}void kern({params}) {{\n{text}\n}}"]
    lines += [
        f"template {qualifier}void kern<{i}>({types});"
        for i in [*(i.format(bits=bits) for i in instances), *extra]
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("body", sorted(KERNELS))
def test_metal_kernel_sources_parse(body, bits, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    unit = tmp_path / "kernel.cpp"
    unit.write_text(
        translation_unit(
            "metal",
            body,
            bits,
            opening=f'#include "{SHIM}"',
            attrs=(", " + ATTRS, ", uint, uint, uint, uint3"),
        )
    )
    run = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", str(unit)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
