"""Builds qkv_attention._C against the torch that is already installed.

Always build with `pip install --no-build-isolation .`: an isolated build environment would fetch
a different torch (a CUDA build of several GB) and the extension would not match the one you run.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "tools"))
from sources import read_sources  # noqa: E402  (the shared source list, csrc/sources.txt)

VERSION = "0.1.0"
SOURCES = read_sources()


def compile_args():
    # The language standard and warnings CMakeLists.txt uses too.
    args = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter",
            f'-DQKV_ATTENTION_VERSION="{VERSION}"']
    if os.environ.get("QKV_ATTENTION_DEBUG") == "1":
        args = ["-O0", "-g"] + args[1:]
    return args


class BuildWithCpuLevels(BuildExtension):
    """Compiles the per-CPU-level sources with their own instruction flags (which the ninja build
    of BuildExtension cannot give single files), then links them after the other objects."""

    def build_extensions(self):
        for ext in self.extensions:
            leveled = [s for s in SOURCES if s.flags]
            headers = [str(p) for p in (ROOT / "csrc").rglob("*.h")]
            abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

            def compile_one(source):
                return self.compiler.compile(
                    [source.path], output_dir=self.build_temp,
                    include_dirs=list(ext.include_dirs) + include_paths(),
                    extra_postargs=compile_args() + [abi] + source.flags, depends=headers)

            with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "2"))) as pool:
                objects = [obj for objs in pool.map(compile_one, leveled) for obj in objs]
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


setup(
    version=VERSION,
    ext_modules=[
        CppExtension(
            name="qkv_attention._C",
            sources=[s.path for s in SOURCES if not s.flags] + ["csrc/python/module.cpp"],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=compile_args(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithCpuLevels},
)
