"""Fixtures shared by every Python test. The helpers (reference attention, random inputs,
tolerances) live in ``tests/python/helpers``: ``from helpers import ...``."""

import os
import pathlib

# Inductor's compiled-code cache is shared by every checkout on the machine (/tmp/
# torchinductor_<user>), and its keys do not cover our C++ ops' schemas: code compiled by a
# checkout whose _attention_forward had another signature was reused here and called the op
# with the old arguments. Each checkout gets a cache of its own (build/ is ignored by git).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[2] / "build" / "inductor-cache"),
)

import pytest  # noqa: E402
import torch  # noqa: E402

import qkv_attention  # noqa: F401,E402  (registers torch.ops.qkv_attention)


@pytest.fixture
def seed_torch():
    """Seeds torch's default generator so that every test sees the same random inputs."""
    torch.manual_seed(0)


@pytest.fixture
def restore_threads():
    """Puts torch.set_num_threads back after a test that changes it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
