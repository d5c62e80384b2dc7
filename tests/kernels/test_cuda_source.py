"""Every kernel body as MLX's cuda_kernel would assemble it (prelude.cu, the body, the template values
as constants), compiled by nvcc for sm_90 where nvcc is installed. This machine has no GPU: the
compile catches what the H200 would otherwise find first, at the price of a device call. The
instances are test_metal_source.py's, with CUDA's types."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.kernels.test_metal_source import KERNELS, translation_unit

HEADER = "#include <cstdint>\n#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"


def cuda_type(msl: str) -> str:
    """An MSL parameter type of test_metal_source.py as the CUDA one MLX writes."""
    return msl.replace("const device ", "const ").replace("device ", "")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("body", sorted(KERNELS))
def test_cuda_kernel_sources_compile(body, bits, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    extra = []
    if body in ("dequant_matvec.inc", "embed_rows.inc"):  # bf16, as a checkpoint computes on a GPU
        extra.append(KERNELS[body][2][0].format(bits=bits).replace("float", "__nv_bfloat16", 1))
    unit = tmp_path / "kernel.cu"
    unit.write_text(
        translation_unit(
            "cuda", body, bits, opening=HEADER, qualifier="__global__ ", type_of=cuda_type, extra=extra
        )
    )
    run = subprocess.run(
        [
            "nvcc",
            "-arch=sm_90",
            "-std=c++17",
            "--ptx",
            "-Werror",
            "all-warnings",
            "-o",
            str(tmp_path / "k.ptx"),
            str(unit),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
