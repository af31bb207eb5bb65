"""The attention kernels' CPU level (default, avx2, avx512) follows torch's CPU capability, which
ATEN_CPU_CAPABILITY forces, and every level this CPU can run gives SDPA's results.

torch reads ATEN_CPU_CAPABILITY once per process, so each level runs in a subprocess of its own
(with MKL_ENABLE_INSTRUCTIONS=AVX2 at the avx2 level, so that the BLAS torch links stays at that
level too). The subprocess saves its outputs and gradients next to SDPA's, computed from the same
inputs in the same process; the comparisons are made here.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import HALF_GRAD_TOLERANCE_OF_MAX, SAME_DTYPE_TOLERANCE, assert_close_to_max

LEVELS = ("default", "avx2", "avx512")  # lowest first
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
REPO = Path(__file__).resolve().parents[3]

# Runs in the subprocess: prints build_info and torch's capability as JSON, then saves
# {case/dtype: {"ours": [...], "sdpa": [...]}} (output, then the gradients) to argv[1].
CHILD = textwrap.dedent(r"""
    import json, math, sys
    import torch
    import torch.nn.functional as F
    import qkv_attention

    ops = torch.ops.qkv_attention
    torch.manual_seed(0)

    def sdpa_mask(attn_mask, padding, is_causal, L, S):
        # Our (attn_mask, key_padding_mask, is_causal) as one additive SDPA mask.
        mask = torch.zeros(L, S, dtype=torch.float64)
        if attn_mask is not None:
            mask = mask + attn_mask.double()
        if padding is not None:
            mask = mask.masked_fill(~padding[:, None, None, :], -math.inf)
        if is_causal:
            mask = mask.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
        return mask

    # name: (B, H, Hkv, L, S, D, Dv, causal, float attn_mask (1, H, L, S) with grad, padding)
    # Lengths past the blocks of every level (128/48 queries; 128/256/512 keys); grouped-query
    # heads; few queries against many keys (the split-key decoding path).
    CASES = {
        "causal_float_mask": (2, 2, 2, 130, 300, 32, 24, True, True, False),
        "gqa_padding": (2, 4, 2, 70, 520, 16, 16, False, False, True),
        "decode_gqa": (1, 4, 1, 3, 1100, 64, 64, False, False, False),
    }

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (B, H, Hkv, L, S, D, Dv, causal, with_mask, with_padding) in CASES.items():
            q = torch.randn(B, H, L, D, dtype=torch.float64).to(dtype)
            k = torch.randn(B, Hkv, S, D, dtype=torch.float64).to(dtype)
            v = torch.randn(B, Hkv, S, Dv, dtype=torch.float64).to(dtype)
            mask = torch.randn(1, H, L, S, dtype=torch.float64).to(dtype) if with_mask else None
            padding = None
            if with_padding:
                padding = torch.rand(B, S) < 0.8
                padding[:, 0] = True  # every row sees a key
            grad_output = torch.randn(B, H, L, Dv, dtype=torch.float64).to(dtype)
            runs = {}

            def run_sdpa(leaves, m):
                combined = sdpa_mask(m, padding, causal, L, S) if (
                    m is not None or padding is not None) else None
                if combined is not None:
                    combined = combined.to(dtype)
                out = F.scaled_dot_product_attention(
                    *leaves, attn_mask=combined, is_causal=causal and combined is None,
                    enable_gqa=Hkv != H)
                out.backward(grad_output)
                return out

            for who in ("ours", "sdpa"):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                m = mask.clone().requires_grad_() if mask is not None else None
                if who == "ours":
                    out = ops.attention(*leaves, m, 0.0, causal, None, padding)
                    out.backward(grad_output)
                else:
                    try:
                        out = run_sdpa(leaves, m)
                    except RuntimeError as error:
                        # torch 2.13's flash-attention CPU backward packs bfloat16 for AMX
                        # whenever the CPU has it, also when ATEN_CPU_CAPABILITY forces a level
                        # below avx512, and then refuses ("pack_vnni2 is only supported when
                        # avx512 is supported"). On such a CPU the reference is SDPA's math
                        # backend.
                        if "pack_vnni2" not in str(error):
                            raise
                        from torch.nn.attention import SDPBackend, sdpa_kernel
                        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                        m = mask.clone().requires_grad_() if mask is not None else None
                        with sdpa_kernel(SDPBackend.MATH):
                            out = run_sdpa(leaves, m)
                grads = [t.grad for t in leaves] + ([m.grad] if m is not None else [])
                runs[who] = [out.detach()] + grads
            results[f"{name}/{dtype}"] = runs
    torch.save(results, sys.argv[1])
    print(json.dumps(dict(info=qkv_attention.build_info(),
                          capability=torch.backends.cpu.get_cpu_capability())))
""")


def level_env(level):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
    }
    if level is not None:
        env["ATEN_CPU_CAPABILITY"] = level
    if level == "avx2":
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    return env


def run_python(code, level, *args):
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=level_env(level),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"subprocess at ATEN_CPU_CAPABILITY={level} exited with {result.returncode}:\n"
        f"{result.stderr[-4000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def best_level():
    """The highest level torch picks on this CPU when nothing forces one."""
    capability = (
        run_python("import torch; print(torch.backends.cpu.get_cpu_capability())", None)
        .strip()
        .lower()
    )
    return capability if capability in LEVELS else "default"


_level_runs = {}


def level_run(level, tmp_path_factory):
    """(printed JSON, saved results) of the child at `level`, run once per module."""
    if level not in _level_runs:
        path = tmp_path_factory.mktemp(f"level_{level}") / "results.pt"
        printed = json.loads(run_python(CHILD, level, str(path)).strip().splitlines()[-1])
        _level_runs[level] = (printed, torch.load(path))
    return _level_runs[level]


def require_level_exists(level):
    if level != "default" and not X86_64:
        pytest.skip(f"{level} is an x86-64 level; this machine is {platform.machine()}")


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_isa_follows_aten_cpu_capability(level, best_level, tmp_path_factory):
    require_level_exists(level)
    printed, _ = level_run(level, tmp_path_factory)
    # torch never goes above what the CPU has: forcing a higher level gives the CPU's best.
    expected = LEVELS[min(LEVELS.index(level), LEVELS.index(best_level))]
    assert printed["capability"].lower() == expected
    assert printed["info"]["cpu_capability"].lower() == expected
    assert printed["info"]["kernel_isa"] == expected


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_matches_sdpa_in_float32_and_bfloat16(level, best_level, tmp_path_factory):
    require_level_exists(level)
    if LEVELS.index(level) > LEVELS.index(best_level):
        pytest.skip(f"this CPU's best level is {best_level}; {level} runs as that one")
    _, results = level_run(level, tmp_path_factory)
    assert len(results) == 6
    for key, runs in results.items():
        dtype = torch.float32 if key.endswith("float32") else torch.bfloat16
        names = ["output", "grad_query", "grad_key", "grad_value", "grad_attn_mask"]
        for name, ours, theirs in zip(names, runs["ours"], runs["sdpa"]):
            assert ours.shape == theirs.shape, f"{level} {key} {name}"
            assert torch.isfinite(ours).all(), f"{level} {key} {name}"
            if dtype == torch.float32 or name == "output":
                # Both sides round to the dtype (helpers' same-dtype tolerances).
                torch.testing.assert_close(
                    ours, theirs, **SAME_DTYPE_TOLERANCE[dtype], msg=f"{level} {key} {name}"
                )
            else:
                # bfloat16 gradients: sums over L or S rounded terms, relative to the largest
                # (ours within 0.7 ulp of it against float64, SDPA 1.8; 4 ulps allowed).
                try:
                    assert_close_to_max(ours, theirs, HALF_GRAD_TOLERANCE_OF_MAX[dtype])
                except AssertionError as error:
                    raise AssertionError(f"{level} {key} {name}: {error}") from None
