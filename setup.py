"""Builds qkv_attention._C against the torch that is already installed.

Always build with `pip install --no-build-isolation .`: an isolated build environment would fetch
a different torch (a CUDA build of several GB) and the extension would not match the one you run.
"""
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"


def operator_sources():
    """The shared source list (csrc/sources.txt), also read by CMakeLists.txt."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.startswith("#")]


def compile_args():
    args = ["-O3", "-fopenmp", f'-DQKV_ATTENTION_VERSION="{VERSION}"']
    if os.environ.get("QKV_ATTENTION_DEBUG") == "1":
        args = ["-O0", "-g"] + args[1:]
    return args


setup(
    version=VERSION,
    ext_modules=[
        CppExtension(
            name="qkv_attention._C",
            sources=operator_sources() + ["csrc/python/module.cpp"],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=compile_args(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
