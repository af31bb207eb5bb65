"""``python -m qkv_attention.check``: exit code 0 when all is well, non-zero when a check fails.

Failures are injected by monkeypatching what the tool calls: an operator with a wrong
gradient, one without a double backward, one that raises, a module whose output is off, a
varlen op that is off, a KV cache that does not advance, and a HuggingFace model that does not
run our operator.
"""

import re
import subprocess
import sys

import pytest
import torch
from torch.autograd.function import once_differentiable

import qkv_attention
from qkv_attention import check

_real_merge_heads = qkv_attention.ops.merge_heads


def _merge_heads_with_wrong_gradient(x, weight, bias=None):
    """The right value, but 0.01 added to every element of x's gradient."""
    shift = x.sum() - x.sum().detach()  # zero, with gradient 1 everywhere
    return _real_merge_heads(x, weight, bias) + 0.01 * shift


class _MergeHeadsOnceDifferentiable(torch.autograd.Function):
    """Right value and right first derivative; no second derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        with torch.no_grad():
            return _real_merge_heads(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        return torch.ops.qkv_attention.merge_heads_backward(grad_output, x, weight)


def _merge_heads_raising(x, weight, bias=None):
    raise RuntimeError("merge_heads: injected failure")


def _cells(output: str, name: str):
    """The cells after the name in the last table row for ``name``."""
    rows = [line for line in output.splitlines() if line.startswith(name + " ")]
    assert rows, f"no table row for {name!r} in:\n{output}"
    return rows[-1][len(name) :].split()


def _only_merge_heads_with_bias():
    return ["--skip-parity", "--only", "merge_heads: bias"]


def test_check_tool_exits_zero_and_prints_every_check_as_passed():
    result = subprocess.run(
        [sys.executable, "-m", "qkv_attention.check"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = [case.name for case in check.gradient_cases()]
    names += [config.name for config in check.parity_configs()]
    names += [other.name for other in check.other_parity_checks()]
    names += [feature.name for feature in check.feature_checks()]
    lines = result.stdout.splitlines()
    for name in names:
        row = [line for line in lines if line.startswith(name + " ")]
        assert row, f"no table row for {name!r}"
        assert row[0].rstrip().endswith("pass"), row[0]
    assert f"all {len(names)} checks passed" in result.stdout
    # A summary in words, not build_info()'s dict.
    assert "{'" not in result.stdout
    assert "our attention kernels at level" in result.stdout
    # Every column has a header that says what it holds (cells are 2+ spaces apart).
    headers = {
        "operator case": ["gradcheck", "gradgradcheck", "time (s)", "result"],
        "configuration": ["max output err", "max grad err", "tolerance (output/grad)", "result"],
        "feature": [
            "compared with",
            "max output err",
            "max grad err",
            "tolerance (output/grad)",
            "result",
        ],
    }
    for first, rest in headers.items():
        (line,) = [line for line in lines if line.startswith(first)]
        assert re.split(r"\s{2,}", line.strip())[1:] == rest, line


def test_check_tool_fails_on_an_op_with_a_wrong_gradient(monkeypatch, capsys):
    assert check.main(_only_merge_heads_with_bias()) == 0  # the real op passes
    monkeypatch.setattr(qkv_attention.ops, "merge_heads", _merge_heads_with_wrong_gradient)
    assert check.main(_only_merge_heads_with_bias()) == 1
    gradcheck, gradgradcheck, _, verdict = _cells(capsys.readouterr().out, "merge_heads: bias")
    assert (gradcheck, gradgradcheck, verdict) == ("FAIL", "-", "FAIL")


def test_check_tool_fails_on_an_op_without_double_backward(monkeypatch, capsys):
    monkeypatch.setattr(qkv_attention.ops, "merge_heads", _MergeHeadsOnceDifferentiable.apply)
    assert check.main(_only_merge_heads_with_bias()) == 1
    gradcheck, gradgradcheck, _, verdict = _cells(capsys.readouterr().out, "merge_heads: bias")
    assert (gradcheck, gradgradcheck, verdict) == ("ok", "FAIL", "FAIL")


def test_check_tool_reports_an_op_that_raises_and_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(qkv_attention.ops, "merge_heads", _merge_heads_raising)
    assert check.main(["--skip-parity", "--only", "merge_heads"]) == 1
    out = capsys.readouterr().out
    assert "merge_heads: injected failure" in out
    # merge_heads_backward does not go through the patched wrapper and still passes.
    assert _cells(out, "merge_heads: bias")[-1] == "FAIL"
    assert _cells(out, "merge_heads_backward")[-1] == "pass"


@pytest.mark.parametrize("offset", [1e-6, float("nan")])
def test_check_tool_fails_when_the_module_differs_from_torch(monkeypatch, capsys, offset):
    real_forward = qkv_attention.MultiheadAttention.forward

    def forward_off_by_offset(self, *args, **kwargs):
        output, weights = real_forward(self, *args, **kwargs)
        return output + offset, weights

    selection = ["--skip-gradcheck", "--only", "self-attention, batch_first"]
    assert check.main(selection) == 0
    monkeypatch.setattr(qkv_attention.MultiheadAttention, "forward", forward_off_by_offset)
    assert check.main(selection) == 1
    output_error, _gradient_error, _tolerance, verdict = _cells(
        capsys.readouterr().out, "self-attention, batch_first"
    )
    assert verdict == "FAIL"
    assert float(output_error) >= 1e-6  # "inf" for NaN parses as inf


def test_check_tool_fails_when_only_the_module_gradient_differs(monkeypatch, capsys):
    real_forward = qkv_attention.MultiheadAttention.forward

    def forward_with_scaled_gradient(self, *args, **kwargs):
        output, weights = real_forward(self, *args, **kwargs)
        return output + 1e-3 * (output - output.detach()), weights  # same value, grad x 1.001

    monkeypatch.setattr(qkv_attention.MultiheadAttention, "forward", forward_with_scaled_gradient)
    assert check.main(["--skip-gradcheck", "--only", "self-attention, batch_first"]) == 1
    output_error, gradient_error, _tolerance, verdict = _cells(
        capsys.readouterr().out, "self-attention, batch_first"
    )
    assert float(output_error) <= 1e-12 and float(gradient_error) > 1e-6 and verdict == "FAIL"


def test_check_tool_fails_when_replace_attention_leaves_torchs_module(monkeypatch, capsys):
    assert check.main(["--skip-gradcheck", "--only", "replace_attention"]) == 0
    monkeypatch.setattr(qkv_attention, "replace_attention", lambda model: model)
    assert check.main(["--skip-gradcheck", "--only", "replace_attention"]) == 1
    assert "left torch's MultiheadAttention in place" in capsys.readouterr().out


def test_check_tool_fails_when_functional_sdpa_differs_from_torch(monkeypatch):
    real_sdpa = qkv_attention.functional.scaled_dot_product_attention
    selection = ["--skip-gradcheck", "--only", "F.sdpa: bool mask"]
    assert check.main(selection) == 0
    monkeypatch.setattr(
        qkv_attention.functional,
        "scaled_dot_product_attention",
        lambda *args, **kwargs: real_sdpa(*args, **kwargs) * (1 + 1e-9),
    )
    assert check.main(selection) == 1


def test_check_tool_lists_checks_and_rejects_an_empty_selection(capsys):
    assert check.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == (
        len(check.gradient_cases())
        + len(check.parity_configs())
        + len(check.other_parity_checks())
        + len(check.feature_checks())
    )
    assert "functional.sdpa vs F.sdpa: enable_gqa" in listed
    assert check.main(["--only", "no check has this name"]) == 1


def test_the_features_cover_varlen_kv_cache_compile_half_types_and_huggingface():
    names = " | ".join(feature.name for feature in check.feature_checks())
    for feature in ("attention_varlen", "KVCache", "torch.compile", "bfloat16", "float16"):
        assert feature in names
    assert "HuggingFace" in names  # transformers is installed in the test environment


def test_check_tool_fails_when_varlen_differs(monkeypatch, capsys):
    real_varlen = qkv_attention.ops.attention_varlen
    selection = ["--skip-gradcheck", "--skip-parity", "--only", "attention_varlen"]
    assert check.main(selection) == 0
    monkeypatch.setattr(
        qkv_attention.ops,
        "attention_varlen",
        lambda *args, **kwargs: real_varlen(*args, **kwargs) * (1 + 1e-9),
    )
    assert check.main(selection) == 1
    assert (
        _cells(capsys.readouterr().out, "attention_varlen: 4 sequences, causal, GQA")[-1] == "FAIL"
    )


def test_check_tool_fails_when_the_kv_cache_does_not_advance(monkeypatch, capsys):
    real_attend = qkv_attention.KVCache.attend

    def attend_without_advancing(self, *args, **kwargs):
        lengths = self.lengths.clone()
        output = real_attend(self, *args, **kwargs)
        self.lengths.copy_(lengths)
        return output

    monkeypatch.setattr(qkv_attention.KVCache, "attend", attend_without_advancing)
    assert check.main(["--skip-gradcheck", "--skip-parity", "--only", "KVCache"]) == 1
    out = capsys.readouterr().out
    assert _cells(out, "KVCache: prefill 6, then 3 decoding steps")[-1] == "FAIL"


def test_check_tool_fails_when_the_huggingface_model_does_not_run_our_op(monkeypatch, capsys):
    """The plug-in registered under our name but pointing at sdpa: equal logits, and yet the
    check must fail, since our operator never ran."""
    import qkv_attention.huggingface as plug_in

    monkeypatch.setattr(plug_in, "register", lambda: "sdpa")
    assert check.main(["--skip-gradcheck", "--skip-parity", "--only", "HuggingFace"]) == 1
    out = capsys.readouterr().out
    assert "qkv_attention::attention ran 0 times" in out


def test_check_tool_says_when_it_cannot_check_huggingface(monkeypatch, capsys):
    monkeypatch.setattr(check, "transformers_installed", lambda: False)
    assert not [f for f in check.feature_checks() if "HuggingFace" in f.name]
    assert check.main(["--skip-gradcheck", "--skip-parity", "--only", "float16"]) == 0
    assert (
        "HuggingFace plug-in: not checked (transformers is not installed)"
        in capsys.readouterr().out
    )
