"""import qkv_attention refuses a torch release other than the one it was built against, naming
both, before it loads the C++ extension (python/qkv_attention/_torch_check.py)."""

import subprocess
import sys

import pytest
import torch

import qkv_attention
from qkv_attention import _torch_check
from qkv_attention._build_torch import TORCH_VERSION as BUILT


def test_release_ignores_the_local_label():
    assert _torch_check.release("2.13.0+cpu") == "2.13.0"
    assert _torch_check.release("2.13.0") == "2.13.0"
    _torch_check.check_torch_version("2.13.0+cpu", "2.13.0")
    _torch_check.check_torch_version("2.13.0", "2.13.0+cu128")


@pytest.mark.parametrize("running", ["2.13.1", "2.12.0+cpu", "3.13.0"])
def test_another_release_raises_naming_both(running):
    with pytest.raises(
        ImportError,
        match=r"built against torch 2\.13\.0\+cpu, but torch "
        + running.replace(".", r"\.").replace("+", r"\+"),
    ):
        _torch_check.check_torch_version("2.13.0+cpu", running)


def test_this_build_was_made_with_the_running_torch():
    assert _torch_check.release(BUILT) == _torch_check.release(torch.__version__)
    assert qkv_attention.build_info()["torch_version"] == _torch_check.release(BUILT)


def test_import_fails_before_loading_the_extension_under_another_torch():
    code = (
        "import sys, torch\n"
        "torch.__version__ = '2.12.1+cpu'\n"
        "try:\n"
        "    import qkv_attention\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "print('loaded _C:', 'qkv_attention._C' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"built against torch {BUILT}, but torch 2.12.1+cpu is installed" in result.stdout
    assert "loaded _C: False" in result.stdout
