"""Packaging and policy: kernel sources ship with the package; the CPU computes in float32."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import pytest

from flashmoe import compute_dtype
from flashmoe.kernels import sources


def _installed() -> bool:
    """Whether an installed distribution (flashmoe-mlx, or an editable install) provides `flashmoe`."""
    return bool(metadata.packages_distributions().get("flashmoe"))


@pytest.mark.skipif(
    not _installed(), reason="flashmoe is not installed in this interpreter (a source tree on PYTHONPATH)"
)
def test_the_installed_package_finds_its_kernel_sources(tmp_path):
    """Import flashmoe as installed (from another folder, so this checkout is not on the path). Runs
    wherever flashmoe is pip-installed (CI, README's setup); the GPU host runs the source tree."""
    probe = (
        "import flashmoe, pathlib; from flashmoe.kernels import sources; "
        "[sources.read_source(n) for n in ('dequant_matvec.inc', 'prelude.metal', 'prelude.cu')]; "
        "print(pathlib.Path(flashmoe.__file__).resolve().parent); print(sources.source_dir().resolve())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    package, source_dir = map(Path, run.stdout.split())
    if "site-packages" in package.parts:  # a wheel install, as in CI: the sources are the wheel's own copy
        assert source_dir == package / "kernels" / "src", f"sources at {source_dir}, package at {package}"


def test_both_preludes_open_the_same_body():
    for backend in ("metal", "cuda"):
        header, body = sources.compose(backend, "dequant_matvec.inc")
        assert (
            "FM_SIMD_SUM" in header
            and "fm_lane" in body
            and body.endswith(sources.read_source("dequant_matvec.inc"))
        )


def test_cpu_computes_in_float32_and_gpus_keep_the_checkpoint_dtype():
    assert compute_dtype(mx.bfloat16, mx.cpu) == mx.float32
    assert compute_dtype(mx.float16, mx.cpu) == mx.float32
    assert compute_dtype(mx.bfloat16, mx.gpu) == mx.bfloat16
    assert compute_dtype(mx.uint32, mx.cpu) == mx.uint32
