"""flashmoe's CUDA kernels run on the CPU: a stand-in for mx.fast.cuda_kernel that assembles a kernel's
source as MLX's CUDA backend does (the inputs typed by their arrays, the template values as constants
at the top of the body), builds it with g++ against tests/shims/cuda_on_cpu.h (every GPU thread an OS
thread, barriers and warp shuffles emulated) and runs the grid block by block.

    with emulated_cuda():            # kernels.backend_available("cuda") is True inside
        y = kernels.dequant_matvec(x, w, s, b, bits=4, group_size=64, backend="cuda")

float32, bf16 (rounded as cuda_bf16.h rounds) and 32-bit integer arrays, evaluated inputs only (no mx.compile),
tiny shapes only (thousands of threads per call). What it checks is the kernel bodies' logic (indexing,
tiling, barriers, shuffles) on a machine without a GPU; the GPU tests check them on one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM = Path(__file__).resolve().parents[1] / "shims" / "cuda_on_cpu.h"
BUILD_DIR = Path(tempfile.gettempdir()) / "flashmoe-emulated-kernels"
C_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t", mx.int32: "int32_t"}
NP_TYPES = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.uint32: np.uint32, mx.int32: np.int32}


def available() -> str | None:
    """None when kernels can be emulated here, else why not."""
    return None if shutil.which("g++") else "g++ is not installed"


def _type_of(value) -> str:
    if isinstance(value, mx.Dtype):
        return C_TYPES[value]
    return str(int(value))


def assemble(
    name: str, header: str, source: str, input_names, inputs, output_names, output_dtypes, template
) -> str:
    """The translation unit: MLX's layout (one __global__ function, constants first) plus a C entry point."""
    params = [f"    const {C_TYPES[a.dtype]}* {n}" for n, a in zip(input_names, inputs)]
    params += [f"    {C_TYPES[d]}* {n}" for n, d in zip(output_names, output_dtypes)]
    consts = [
        f"  using {k} = {_type_of(v)};" if isinstance(v, mx.Dtype) else f"  constexpr int {k} = {int(v)};"
        for k, v in template
    ]
    call_args = [f"({C_TYPES[a.dtype]}*)a[{i}]" for i, a in enumerate(inputs)]
    call_args += [f"({C_TYPES[d]}*)a[{len(inputs) + i}]" for i, d in enumerate(output_dtypes)]
    return "\n".join(
        [
            f'#include "{SHIM}"',
            header,
            f"__global__ void {name}(\n" + ",\n".join(params) + ") {",
            *consts,
            source,
            "}",
            'extern "C" void fm_run(void** a, int gx, int gy, int threads) {',
            f"  fm_launch([&] {{ {name}({', '.join(call_args)}); }}, gx, gy, threads);",
            "}",
        ]
    )


_libraries: dict[str, ctypes.CDLL] = {}


def build(unit: str) -> ctypes.CDLL:
    """The shared library for a translation unit, built once per distinct source."""
    key = hashlib.sha256(unit.encode()).hexdigest()[:20]
    if key not in _libraries:
        BUILD_DIR.mkdir(exist_ok=True)
        lib = BUILD_DIR / f"{key}.so"
        if not lib.exists():
            src = BUILD_DIR / f"{key}.cpp"
            src.write_text(unit)
            tmp = BUILD_DIR / f"{key}.{id(unit)}.so"
            run = subprocess.run(
                ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(tmp), str(src)],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                raise RuntimeError(f"emulated kernel did not build:\n{run.stderr[-4000:]}")
            tmp.rename(lib)
        _libraries[key] = ctypes.CDLL(str(lib))
    return _libraries[key]


class EmulatedKernel:
    """What mx.fast.cuda_kernel returns, run on the CPU."""

    def __init__(self, name, input_names, output_names, source, header="", **_):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header = source, header

    def __call__(
        self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None, **_
    ):
        inputs = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
        for n, a in zip(self.input_names, inputs):
            if a.dtype not in C_TYPES:
                raise TypeError(f"emulated kernels take float32, bf16 and 32-bit integers; {n} is {a.dtype}")
        unit = assemble(
            self.name,
            self.header,
            self.source,
            self.input_names,
            inputs,
            self.output_names,
            output_dtypes,
            template,
        )
        lib = build(unit)
        host_in = [np.ascontiguousarray(np.array(_bits(a))) for a in inputs]
        host_out = [
            np.full(s, _fill(init_value, d), dtype=NP_TYPES[d]) for s, d in zip(output_shapes, output_dtypes)
        ]
        pointers = (ctypes.c_void_p * (len(host_in) + len(host_out)))(
            *[a.ctypes.data_as(ctypes.c_void_p) for a in host_in + host_out]
        )
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        gx, gy = math.ceil(grid[0] / threadgroup[0]), math.ceil(grid[1] / threadgroup[1])
        lib.fm_run(pointers, gx, gy, threads)
        return [
            mx.array(o).view(d) if d == mx.bfloat16 else mx.array(o) for o, d in zip(host_out, output_dtypes)
        ]


def _bits(a: mx.array) -> mx.array:
    """bf16 as its 16-bit patterns (numpy has no bf16), anything else as it is."""
    return a.view(mx.uint16) if a.dtype == mx.bfloat16 else a


def _fill(init_value, dtype):
    """An output's value before the kernel runs: init_value (tests poison float outputs with NaN,
    which an integer output cannot hold: it gets all bits set instead)."""
    if init_value is None:
        return 0
    if dtype == mx.bfloat16:
        return np.array(mx.array([init_value]).astype(mx.bfloat16).view(mx.uint16))[0]
    if dtype == mx.float32 or not math.isnan(init_value):
        return init_value
    return -1 if dtype == mx.int32 else np.iinfo(np.uint32).max


@contextlib.contextmanager
def emulated_cuda():
    """mx.fast.cuda_kernel emulated and the "cuda" backend reported available, for the with-block."""
    from flashmoe import kernels
    from flashmoe.kernels import gpu

    saved = (mx.fast.cuda_kernel, kernels.backend_available)
    real_available = kernels.backend_available
    mx.fast.cuda_kernel = EmulatedKernel
    kernels.backend_available = lambda b: b == "cuda" or real_available(b)
    for cached in (gpu.kernel, gpu._kernel):
        cached.cache_clear()
    try:
        yield
    finally:
        mx.fast.cuda_kernel, kernels.backend_available = saved
        for cached in (gpu.kernel, gpu._kernel):
            cached.cache_clear()
