"""The newer kernel bodies (qdot_tile core, fused MoE, gated delta step) as Metal, read by g++
through the MSL shim (tests/shims/metal_as_cpp.h), as tests/test_metal_source.py does for the matvec."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flashmoe.kernels import gpu

SHIM = Path(__file__).parent.parent / "shims" / "metal_as_cpp.h"
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
KERNELS = {
    "dequant_matvec.inc": (
        "typename T, int BITS, int GROUP_SIZE, int SIMDS, int RPS, int UNROLL, int TILE",
        [
            ("x", IN_F),
            ("w", IN_U),
            ("scales", IN_F),
            ("biases", IN_F),
            ("idx", IN_U),
            ("dims", IN_I),
            ("y", OUT_F),
        ],
        [
            "float, {bits}, 64, 8, 2, 4 | 5 << 4 | 1 << 8, 4096",
            "float, {bits}, 32, 8, 1, 2 | 2 << 4, 96",
        ],
    ),
    "moe_gate_up.inc": (
        "typename T, int BITS, int GROUP_SIZE, int RPS, int SIMDS, int LPR, int VEC, int U, int TILE",
        [
            ("x", IN_F),
            ("gw", IN_U),
            ("gs", IN_F),
            ("gb", IN_F),
            ("uw", IN_U),
            ("us", IN_F),
            ("ub", IN_F),
            ("ids", IN_U),
            ("dims", IN_I),
            ("y", OUT_F),
        ],
        ["float, {bits}, 64, 1, 8, 32, 4, 2, 2048"],
    ),
    "moe_down.inc": (
        "typename T, int BITS, int GROUP_SIZE, int K, int SIMDS, int LPR, int VEC, int U, int TILE",
        [
            ("h", IN_F),
            ("w", IN_U),
            ("scales", IN_F),
            ("biases", IN_F),
            ("ids", IN_U),
            ("rw", IN_F),
            ("dims", IN_I),
            ("y", OUT_F),
        ],
        ["float, {bits}, 64, 10, 8, 16, 4, 1, 768"],
    ),
    "gated_delta_step.inc": (
        "typename T, int DK, int DV, int W, int HV, int HK, int SIMDS",
        [
            (n, IN_F)
            for n in (
                "qkv",
                "conv_state",
                "conv_w",
                "z",
                "b",
                "a",
                "A_log",
                "dt_bias",
                "norm_w",
                "state",
                "eps",
            )
        ]
        + [("out", OUT_F), ("state_out", OUT_F), ("conv_out", OUT_F)],
        ["float, 128, 128, 4, 32, 16, 8"],
    ),
}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("body", sorted(KERNELS))
def test_new_metal_kernel_sources_parse(body, bits, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    tparams, args, instances = KERNELS[body]
    header, text = gpu.compose("metal", body)
    assert gpu.CORE_MARKER not in text
    params = ", ".join(f"{t} {n}" for n, t in args) + ", " + ATTRS
    types = ", ".join(t for _, t in args) + ", uint, uint, uint, uint3"
    lines = [
        f'#include "{SHIM}"',
        header,
        f"template <{tparams}>\nvoid kern({params}) {{\n{text}\n}}",
    ]
    lines += [f"template void kern<{inst.format(bits=bits)}>({types});" for inst in instances]
    unit = tmp_path / "kernel.cpp"
    unit.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", str(unit)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
