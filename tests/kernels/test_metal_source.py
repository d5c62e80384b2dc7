"""The Metal kernel, as MLX's metal_kernel would assemble it, read by g++ through a small MSL shim.

Metal cannot run on Linux; this catches typos in prelude.metal and in the common body before
the Apple Silicon workflow (.github/workflows/metal.yml) compiles and runs it for real.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flashmoe.kernels import sources

SHIM = Path(__file__).resolve().parents[1] / "shims" / "metal_as_cpp.h"
SIGNATURE = """
template <typename T, int BITS, int GROUP_SIZE, int SIMDS, int RPS, int UNROLL, int TILE>
void flashmoe_dequant_matvec(
    const device T* x, const device uint32_t* w, const device T* scales, const device T* biases,
    const device uint32_t* idx, const device int32_t* dims, device T* y,
    uint thread_index_in_simdgroup, uint simdgroup_index_in_threadgroup,
    uint thread_index_in_threadgroup, uint3 threadgroup_position_in_grid) {
"""


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_metal_kernel_source_parses(bits, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    header, body = sources.compose("metal", "dequant_matvec.inc")
    unit = tmp_path / "kernel.cpp"
    unit.write_text(
        f'#include "{SHIM}"\n{header}\n{SIGNATURE}{body}\n}}\n'
        f"template void flashmoe_dequant_matvec<float, {bits}, 64, 8, 2, 4, 2048>("
        "const float*, const uint32_t*, const float*, const float*, const uint32_t*, const int32_t*,"
        " float*, uint, uint, uint, uint3);\n"
    )
    run = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", str(unit)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
