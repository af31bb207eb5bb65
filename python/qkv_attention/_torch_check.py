"""The torch the extension was built against must be the torch that imports it.

``qkv_attention._C`` is compiled against one torch release's C++ headers and libraries; loaded
into another release it fails with an ``undefined symbol`` or, worse, loads and misbehaves.
setup.py records the building torch's version in ``_build_torch.py`` (generated, not kept in
git), and ``import qkv_attention`` compares it with the running torch before loading ``_C``.
Releases are compared as major.minor.patch: a local label such as ``+cpu`` is a build of the
same release.
"""


def release(version: str) -> str:
    """ "2.13.0+cpu" -> "2.13.0"; "2.13.0a0+git1234" -> "2.13.0a0"."""
    return str(version).split("+", 1)[0]


def check_torch_version(built: str, running: str) -> None:
    """Raises ImportError naming both versions when their releases differ."""
    if release(built) != release(running):
        raise ImportError(
            f"qkv_attention was built against torch {built}, but torch {running} is installed; "
            "rebuild it with this torch (make build, or pip install --no-build-isolation .)"
        )


def check_installed_torch() -> None:
    """check_torch_version for the build's record and the imported torch."""
    import torch

    try:
        from ._build_torch import TORCH_VERSION
    except ImportError:
        raise ImportError(
            "qkv_attention has no record of the torch it was built against "
            "(qkv_attention/_build_torch.py, written by setup.py); rebuild it "
            "(make build, or pip install --no-build-isolation .)"
        ) from None
    check_torch_version(TORCH_VERSION, torch.__version__)
