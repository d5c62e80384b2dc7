"""Build step for flashmoe's native CPU kernels; metadata stays in pyproject.toml.

`pip install .` runs CMake on native/ to build the top-level module `_flashmoe_native`
against the mlx in the build environment. Without a compiler or cmake the build prints a
warning and flashmoe installs without it (flashmoe then uses MLX's own CPU kernels).
Set FLASHMOE_NATIVE=0 to skip the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake() -> str | None:
    try:
        import cmake  # the pip package, when the build environment has it

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    return shutil.which("cmake")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("FLASHMOE_NATIVE", "1") == "0":
            print("flashmoe: FLASHMOE_NATIVE=0, skipping the native CPU kernels")
            return
        try:
            self._build(ext)
        except Exception as e:  # never fail the install over the optional extension
            print(
                f"\nWARNING: flashmoe's native CPU kernels (_flashmoe_native) were not built: {e}\n"
                "WARNING: flashmoe installs without them and uses MLX's CPU kernels; install a C++17 "
                "compiler and cmake (on a Mac: xcode-select --install; pip install cmake) and reinstall.\n",
                file=sys.stderr,
            )

    def _build(self, ext: Extension) -> None:
        cmake = _cmake()
        if cmake is None:
            raise RuntimeError("cmake not found")
        build_dir = Path(self.build_temp).resolve() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S",
            str(ROOT / "native"),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], check=True)
        built = sorted(build_dir.glob("_flashmoe_native*.so")) + sorted(
            build_dir.glob("Release/_flashmoe_native*.so")
        )
        if not built:
            raise RuntimeError(f"cmake produced no _flashmoe_native module in {build_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], target)
        print(f"flashmoe: built {target}")


setup(
    ext_modules=[Extension("_flashmoe_native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
