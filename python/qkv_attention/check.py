"""Checks the operators and the drop-in module on this machine: ``python -m qkv_attention.check``.

Two parts, each printed as a table:

1. **Gradients of every operator** (float64, small shapes): ``torch.autograd.gradcheck`` compares
   the analytical gradients (our C++ backward operators) with finite differences, and
   ``gradgradcheck`` does the same for the second derivatives (the differentiable backward path).
   The backward operators are themselves differentiable and are checked too. The one operator
   left out is ``_attention_dropout_mask``: its output is a boolean mask, with no gradient.
2. **Parity with torch.nn.MultiheadAttention** over a set of configurations (batch_first, masks,
   kdim/vdim, bias_kv, zero_attn, need_weights, ...): both modules start from the same
   state_dict and see the same inputs; the table shows the largest difference in the outputs
   (and returned attention weights) and in the gradients of inputs and parameters. Also in that
   table: a torch.nn.TransformerEncoderLayer before and after ``replace_attention``, and
   ``qkv_attention.functional.scaled_dot_product_attention`` against torch's.
3. **Features** beyond the module, each against a reference on the same inputs: variable-length
   batches (``attention_varlen`` against torch's SDPA on each sequence), the KV cache (prefill
   then decoding steps against torch's SDPA on the whole sequence), ``torch.compile`` of the
   module (against eager), bfloat16 and float16 (against torch's SDPA in float64) and, when
   transformers is installed, the HuggingFace plug-in (a tiny Llama-style model against sdpa).

It first prints what was built: the package and torch versions, the compiler, and the CPU level
the attention kernels run at. The exit code is 0 when every check passes and 1 otherwise, so the tool can gate a script.
The cases live in ``qkv_attention._cases`` (the tests run them too); this module runs and reports
them. It depends on the installed package only (not on the repository's tests or examples).
"""

import argparse
import copy
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _cases, functional
from ._cases import GradientCase, ParityConfig, gradient_cases, parity_configs

__all__ = [
    "main",
    "gradient_cases",
    "parity_configs",
    "other_parity_checks",
    "feature_checks",
    "run_gradient_checks",
    "run_parity_checks",
    "run_other_parity_checks",
    "GradientCase",
    "ParityConfig",
    "ParityCheck",
]

# --------------------------------------------------------------------------------------------
# Part 1: gradcheck / gradgradcheck of every operator
# --------------------------------------------------------------------------------------------


@dataclass
class GradientResult:
    name: str
    gradcheck: str  # "ok", "FAIL" or "-" (not run)
    gradgradcheck: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return "FAIL" not in (self.gradcheck, self.gradgradcheck)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip()}"


def run_gradient_checks(
    cases: Sequence[GradientCase], second_order: bool = True, fast_mode: bool = False
) -> List[GradientResult]:
    results = []
    for index, case in enumerate(cases):
        generator = torch.Generator().manual_seed(1000 + index)
        inputs = case.make_inputs(generator)
        start = time.perf_counter()
        first, second, detail = "-", "-", ""
        try:
            torch.autograd.gradcheck(case.function, inputs, fast_mode=fast_mode)
            first = "ok"
        except Exception as error:  # gradcheck raises GradcheckError; the op may raise others
            first, detail = "FAIL", _describe(error)
        if second_order and first == "ok":
            try:
                torch.autograd.gradgradcheck(case.function, inputs, fast_mode=fast_mode)
                second = "ok"
            except Exception as error:
                second, detail = "FAIL", _describe(error)
        results.append(
            GradientResult(case.name, first, second, time.perf_counter() - start, detail)
        )
    return results


# --------------------------------------------------------------------------------------------
# Part 2: parity with torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


@dataclass
class ParityResult:
    name: str
    output_error: float
    gradient_error: Optional[float]  # None: the check has no gradients (inference only)
    tolerance: Tuple[float, float]
    seconds: float
    detail: str = ""
    reference: str = ""  # what ours was compared with (the features' table shows it)

    @property
    def passed(self) -> bool:
        return (
            not self.detail
            and self.output_error <= self.tolerance[0]
            and (self.gradient_error is None or self.gradient_error <= self.tolerance[1])
        )


def run_parity_checks(configs: Sequence[ParityConfig]) -> List[ParityResult]:
    from . import MultiheadAttention as OurMultiheadAttention  # written after ops; see __init__

    results = []
    for index, config in enumerate(configs):
        start = time.perf_counter()
        tolerance = _cases.TOLERANCES[config.dtype]
        try:
            torch.manual_seed(index)
            theirs = nn.MultiheadAttention(**_cases.module_kwargs(config))
            torch.manual_seed(index)
            ours = OurMultiheadAttention(**_cases.module_kwargs(config))
            init_error, detail = _cases.initialisation_difference(ours, theirs)
            if init_error > 0 and not detail:
                detail = f"different initial weights from the same seed (max diff {init_error:.2e})"
            ours.load_state_dict(theirs.state_dict())  # compare the math from equal weights
            if config.eval_mode:
                ours.eval()
                theirs.eval()
            query, key, value, kwargs = _cases.make_call(
                config, torch.Generator().manual_seed(index)
            )
            ours_out = _cases.forward_backward(ours, query, key, value, kwargs, 7 + index)
            theirs_out = _cases.forward_backward(theirs, query, key, value, kwargs, 7 + index)
            output_error = max(
                _cases.max_abs_difference(ours_out[0], theirs_out[0]),
                _cases.max_abs_difference(ours_out[1], theirs_out[1]),
            )
            gradient_errors = [
                _cases.max_abs_difference(a, b) for a, b in zip(ours_out[2], theirs_out[2])
            ]
            if set(ours_out[3]) != set(theirs_out[3]):
                detail = detail or "parameter names differ"
            gradient_errors += [
                _cases.max_abs_difference(ours_out[3][name], theirs_out[3].get(name))
                for name in ours_out[3]
            ]
            gradient_error = max(gradient_errors)
        except Exception as error:  # report and go on: one broken config must not hide the rest
            output_error = gradient_error = math.inf
            detail = _describe(error)
        results.append(
            ParityResult(
                config.name,
                output_error,
                gradient_error,
                tolerance,
                time.perf_counter() - start,
                detail,
            )
        )
    return results


@dataclass(frozen=True)
class ParityCheck:
    """A comparison with a reference that is not a MultiheadAttention configuration.

    ``compare()`` returns (max output error, max gradient error or None when nothing is
    differentiated); ``tolerance`` bounds them (float64's unless given).
    """

    name: str
    compare: Callable[[], Tuple[float, Optional[float]]]
    tolerance: Tuple[float, float] = _cases.TOLERANCES[_cases.F64]
    reference: str = "torch"


def _replace_attention_in_encoder_layer() -> Tuple[float, float]:
    """A torch.nn.TransformerEncoderLayer before and after ``replace_attention``."""
    from . import MultiheadAttention as OurMultiheadAttention
    from . import replace_attention

    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(
        _cases.E, _cases.HEADS, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=_cases.F64
    )
    ours = replace_attention(copy.deepcopy(theirs))
    if not isinstance(ours.self_attn, OurMultiheadAttention):
        raise AssertionError("replace_attention left torch's MultiheadAttention in place")
    x = torch.randn(
        _cases.BATCH,
        _cases.QLEN,
        _cases.E,
        generator=torch.Generator().manual_seed(3),
        dtype=_cases.F64,
    )
    padding = torch.zeros(_cases.BATCH, _cases.QLEN, dtype=torch.bool)
    padding[1, -2:] = True
    outputs, grads = [], []
    for layer in (ours, theirs):
        inp = x.clone().requires_grad_()
        out = layer(inp, src_key_padding_mask=padding)
        names, params = zip(*layer.named_parameters())
        g = torch.autograd.grad(out.square().sum(), [inp, *params])
        outputs.append(out)
        grads.append(dict(zip(("input", *names), g)))
    gradient_error = max(_cases.max_abs_difference(grads[0][n], grads[1].get(n)) for n in grads[0])
    return _cases.max_abs_difference(outputs[0], outputs[1]), gradient_error


def _sdpa_against_torch(q_shape, k_shape, v_shape, mask: Optional[str] = None, **kwargs):
    """functional.scaled_dot_product_attention against torch's, float64, output and gradients
    of query, key, value (and of a float mask)."""

    def compare() -> Tuple[float, float]:
        g = torch.Generator().manual_seed(11)
        inputs = [
            torch.randn(*shape, generator=g, dtype=_cases.F64)
            for shape in (q_shape, k_shape, v_shape)
        ]
        L, S = q_shape[-2], k_shape[-2]
        if mask == "bool":  # True = may attend; key 0 always, so no row is empty
            attn_mask = torch.rand(L, S, generator=g) < 0.6
            attn_mask[:, 0] = True
            inputs.append(attn_mask)
        elif mask == "float":
            inputs.append(torch.randn(q_shape[0], 1, L, S, generator=g, dtype=_cases.F64))
        results = []
        for function in (
            functional.scaled_dot_product_attention,
            nn.functional.scaled_dot_product_attention,
        ):
            leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = function(*leaves[:3], attn_mask=leaves[3] if mask else None, **kwargs)
            grad_out = torch.randn(
                out.shape, generator=torch.Generator().manual_seed(5), dtype=_cases.F64
            )
            differentiable = [t for t in leaves if t.requires_grad]
            results.append((out, torch.autograd.grad(out, differentiable, grad_out)))
        (ours_out, ours_grads), (theirs_out, theirs_grads) = results
        return (
            _cases.max_abs_difference(ours_out, theirs_out),
            max(_cases.max_abs_difference(a, b) for a, b in zip(ours_grads, theirs_grads)),
        )

    return compare


def other_parity_checks() -> List[ParityCheck]:
    return [
        ParityCheck(
            "replace_attention(TransformerEncoderLayer)", _replace_attention_in_encoder_layer
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: no mask",
            _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3)),
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: bool mask (L, S)",
            _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), mask="bool"),
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: float mask with grad, scale=0.3",
            _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), mask="float", scale=0.3),
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: is_causal, L=5 < S=6",
            _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), is_causal=True),
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: 3-D inputs",
            _sdpa_against_torch((3, 5, 4), (3, 6, 4), (3, 6, 3)),
        ),
        ParityCheck(
            "functional.sdpa vs F.sdpa: enable_gqa",
            _sdpa_against_torch((1, 4, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), enable_gqa=True),
        ),
    ]


def run_other_parity_checks(checks: Sequence[ParityCheck]) -> List[ParityResult]:
    results = []
    for check in checks:
        start = time.perf_counter()
        detail = ""
        try:
            output_error, gradient_error = check.compare()
        except Exception as error:
            output_error = gradient_error = math.inf
            detail = _describe(error)
        results.append(
            ParityResult(
                check.name,
                output_error,
                gradient_error,
                check.tolerance,
                time.perf_counter() - start,
                detail,
                check.reference,
            )
        )
    return results


# --------------------------------------------------------------------------------------------
# Part 3: features beyond the module, each against a reference
# --------------------------------------------------------------------------------------------


def _leaves(tensors: Sequence[Tensor], dtype: torch.dtype) -> List[Tensor]:
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _output_and_gradients(function, inputs: Sequence[Tensor], grad_out: Tensor):
    out = function(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def _largest_differences(ours, theirs) -> Tuple[float, float]:
    """(output error, largest gradient error) of two _output_and_gradients results."""
    return (
        _cases.max_abs_difference(ours[0], theirs[0]),
        max(_cases.max_abs_difference(a, b) for a, b in zip(ours[1], theirs[1])),
    )


def _varlen_against_sdpa_per_sequence() -> Tuple[float, float]:
    """attention_varlen over packed sequences of lengths 3, 0, 5 and 1 (queries) and 4, 2, 5, 3
    (keys), causal, 4 query heads on 2 key/value heads, against torch's SDPA on each sequence."""
    from . import ops

    g = torch.Generator().manual_seed(21)
    q_lengths, k_lengths = [3, 0, 5, 1], [4, 2, 5, 3]
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()])
    q = torch.randn(sum(q_lengths), 4, 6, generator=g, dtype=_cases.F64)  # (total_q, H, D)
    k = torch.randn(sum(k_lengths), 2, 6, generator=g, dtype=_cases.F64)  # (total_k, Hkv, D)
    v = torch.randn(sum(k_lengths), 2, 5, generator=g, dtype=_cases.F64)  # (total_k, Hkv, Dv)
    grad_out = torch.randn(sum(q_lengths), 4, 5, generator=g, dtype=_cases.F64)

    def packed(q, k, v):
        return ops.attention_varlen(q, k, v, cu_q, cu_k, 5, 5, is_causal=True)

    def per_sequence(q, k, v):
        outputs = []
        for b in range(len(q_lengths)):
            rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            # (L_b, H, D) -> (1, H, L_b, D); a sequence without keys gives zeros, as ours.
            qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[rows_q], k[rows_k], v[rows_k]))
            if kb.shape[2] == 0:
                outputs.append(q[rows_q].new_zeros(q_lengths[b], 4, 5))
                continue
            ob = nn.functional.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, enable_gqa=True
            )
            outputs.append(ob[0].transpose(0, 1))  # (1, H, L_b, Dv) -> (L_b, H, Dv)
        return torch.cat(outputs)

    ours = _output_and_gradients(packed, _leaves((q, k, v), _cases.F64), grad_out)
    theirs = _output_and_gradients(per_sequence, _leaves((q, k, v), _cases.F64), grad_out)
    return _largest_differences(ours, theirs)


def _kv_cache_against_sdpa() -> Tuple[float, None]:
    """KVCache: a prompt of 6 then 3 one-token steps, 4 query heads on 2 key/value heads,
    against torch's causal SDPA over the whole sequence (the last 3 rows are the steps')."""
    from . import KVCache

    g = torch.Generator().manual_seed(22)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=_cases.F64)  # (B, H, L, D)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=_cases.F64)  # (B, Hkv, L, D)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=_cases.F64)
    cache = KVCache(2, 2, max_len=16, head_dim=8, dtype=_cases.F64)
    with torch.no_grad():
        steps = [slice(0, 6), slice(6, 7), slice(7, 8), slice(8, 9)]
        ours = torch.cat([cache.attend(q[:, :, s], k[:, :, s], v[:, :, s]) for s in steps], 2)
    theirs = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if cache.lengths.tolist() != [9, 9]:
        raise AssertionError(f"KVCache.lengths is {cache.lengths.tolist()} after 9 tokens")
    return _cases.max_abs_difference(ours, theirs), None


def _compiled_module_against_eager() -> Tuple[float, float]:
    """torch.compile(fullgraph=True) (Inductor) of the module with a padding mask, outputs and
    input gradients against eager: our ops are opaque to the compiler, so they agree closely."""
    from . import MultiheadAttention as OurMultiheadAttention

    torch.manual_seed(23)
    module = OurMultiheadAttention(_cases.E, _cases.HEADS, batch_first=True, dtype=_cases.F64)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(_cases.BATCH, _cases.QLEN, _cases.E, generator=g, dtype=_cases.F64)
    padding = torch.zeros(_cases.BATCH, _cases.QLEN, dtype=torch.bool)
    padding[1, -2:] = True
    grad_out = torch.randn(x.shape, generator=g, dtype=_cases.F64)

    def attend(call):
        return lambda x: call(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    compiled = torch.compile(module, fullgraph=True)
    ours = _output_and_gradients(attend(compiled), _leaves((x,), _cases.F64), grad_out)
    eager = _output_and_gradients(attend(module), _leaves((x,), _cases.F64), grad_out)
    return _largest_differences(ours, eager)


# Half types against float64: values of order 1 whose sums are accumulated in float32, so the
# error is the inputs' and the output's rounding, a few units of the dtype's eps (bfloat16
# 7.8e-3, float16 9.8e-4); torch's own SDPA in the same dtype is off by as much (measured:
# bfloat16 7.9e-3 output, 1.4e-2 gradients; float16 9.2e-4 and 1.9e-3).
HALF_TOLERANCES = {torch.bfloat16: (2e-2, 4e-2), torch.float16: (3e-3, 6e-3)}


def _half_attention_against_float64(dtype: torch.dtype):
    def compare() -> Tuple[float, float]:
        from . import ops

        g = torch.Generator().manual_seed(24)
        # Rounded to the half type first, so that the float64 reference sees the same inputs.
        q, k, v, grad_out = (
            torch.randn(2, 4, 37, 16, generator=g).to(dtype).double() for _ in range(4)
        )

        def attend(q, k, v):
            return ops.attention(q, k, v, is_causal=True)

        ours = _output_and_gradients(attend, _leaves((q, k, v), dtype), grad_out)
        reference = _output_and_gradients(
            lambda q, k, v: nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            _leaves((q, k, v), _cases.F64),
            grad_out,
        )
        return _largest_differences(ours, reference)

    return compare


def _huggingface_llama_against_sdpa() -> Tuple[float, float]:
    """A 2-layer Llama-style model (4 query heads on 2 key/value heads, random weights from a
    config, float64) with attn_implementation "qkv_attention" against "sdpa": logits of a
    left-padded batch and the parameters' gradients of a loss on them. The profiler confirms
    that our operator runs in every layer of one model and in no layer of the other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .huggingface import register

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        # Weights of order 1 instead of transformers' 0.02: with tiny weights the attention
        # barely moves the logits, and any attention would agree with sdpa.
        initializer_range=0.5,
    )
    torch.manual_seed(25)
    theirs = LlamaForCausalLM(config).to(_cases.F64)
    theirs.set_attn_implementation("sdpa")
    ours = copy.deepcopy(theirs)  # a config of its own: one shared config would switch both
    ours.set_attn_implementation(register())
    if theirs.config._attn_implementation != "sdpa":
        raise AssertionError("the reference model no longer runs sdpa")
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(25))
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    results: List[Tuple[Tensor, Dict[str, Tensor]]] = []
    for model in (ours, theirs):
        with torch.profiler.profile() as profile:
            logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        calls = sum(e.count for e in profile.key_averages() if e.key == "qkv_attention::attention")
        if calls != (config.num_hidden_layers if model is ours else 0):
            raise AssertionError(
                f"qkv_attention::attention ran {calls} times in the "
                f"{model.config._attn_implementation} model's forward"
            )
        names, params = zip(*model.named_parameters())
        grads = torch.autograd.grad(logits.square().mean(), params)
        results.append((logits, dict(zip(names, grads))))
    (ours_logits, ours_grads), (theirs_logits, theirs_grads) = results
    return (
        _cases.max_abs_difference(ours_logits, theirs_logits),
        max(_cases.max_abs_difference(ours_grads[n], theirs_grads.get(n)) for n in ours_grads),
    )


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def feature_checks() -> List[ParityCheck]:
    """Part 3; the HuggingFace check only when transformers is installed."""
    f32 = _cases.TOLERANCES[torch.float32]
    checks = [
        ParityCheck(
            "attention_varlen: 4 sequences, causal, GQA",
            _varlen_against_sdpa_per_sequence,
            reference="F.sdpa per sequence (float64)",
        ),
        ParityCheck(
            "KVCache: prefill 6, then 3 decoding steps",
            _kv_cache_against_sdpa,
            reference="causal F.sdpa, whole sequence (float64)",
        ),
        ParityCheck(
            "torch.compile(fullgraph=True) of the module",
            _compiled_module_against_eager,
            tolerance=f32,  # Inductor may reorder the few float64 sums around our ops
            reference="the eager module (float64)",
        ),
    ]
    checks += [
        ParityCheck(
            f"attention in {str(dtype).replace('torch.', '')}, causal",
            _half_attention_against_float64(dtype),
            tolerance=HALF_TOLERANCES[dtype],
            reference="F.sdpa on the same values in float64",
        )
        for dtype in (torch.bfloat16, torch.float16)
    ]
    if transformers_installed():
        checks.append(
            ParityCheck(
                "HuggingFace: Llama-style model, left padding",
                _huggingface_llama_against_sdpa,
                reference='the same model on "sdpa" (float64)',
            )
        )
    return checks


# --------------------------------------------------------------------------------------------
# Output and command line
# --------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_gradient_table(results: Sequence[GradientResult]) -> str:
    rows = [
        [r.name, r.gradcheck, r.gradgradcheck, f"{r.seconds:.2f}", "pass" if r.passed else "FAIL"]
        for r in results
    ]
    return _table(
        ["operator case (float64)", "gradcheck", "gradgradcheck", "time (s)", "result"], rows
    )


def _number(x: Optional[float]) -> str:
    if x is None:
        return "-"  # nothing differentiated
    return "inf" if math.isinf(x) else f"{x:.1e}"


def _results_table(results: Sequence[ParityResult], subject: str, with_reference: bool) -> str:
    """One row per result: its name (and what it was compared with), the errors, the
    tolerances and the verdict."""
    rows = [
        [r.name]
        + ([r.reference] if with_reference else [])
        + [
            _number(r.output_error),
            _number(r.gradient_error),
            f"{r.tolerance[0]:.0e}/{r.tolerance[1]:.0e}",
            "pass" if r.passed else "FAIL",
        ]
        for r in results
    ]
    headers = [subject] + (["compared with"] if with_reference else [])
    headers += ["max output err", "max grad err", "tolerance (output/grad)", "result"]
    return _table(headers, rows)


def format_parity_table(results: Sequence[ParityResult]) -> str:
    return _results_table(results, "configuration (ours vs torch, same inputs)", False)


def format_feature_table(results: Sequence[ParityResult]) -> str:
    return _results_table(results, "feature (ours)", True)


def format_build_summary(info: Dict[str, object]) -> str:
    """build_info() as sentences: what was built, with what, and which kernels run here."""
    on_off = {True: "on", False: "off"}
    return "\n".join(
        [
            f"qkv_attention {info['version']}, built against torch {info['torch_version']} "
            f"with {info['compiler']} (OpenMP {on_off[bool(info['openmp'])]}, "
            f"C++11 ABI {on_off[bool(info['cxx11_abi'])]})",
            f"running on torch {torch.__version__}; torch's CPU capability "
            f"{info['cpu_capability']}, our attention kernels at level {info['kernel_isa']}",
            f"threads while checking: {info['num_threads']} (--threads N to change)",
        ]
    )


def _select(items, patterns: Optional[Sequence[str]]):
    if not patterns:
        return list(items)
    return [item for item in items if any(p.lower() in item.name.lower() for p in patterns)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qkv_attention.check",
        description="gradcheck/gradgradcheck of every qkv_attention operator, parity of "
        "qkv_attention.MultiheadAttention with torch.nn.MultiheadAttention, and the features "
        "(varlen, KV cache, torch.compile, half types, HuggingFace) against references. "
        "Exit code 0 when everything passes, 1 otherwise.",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the checks whose name contains TEXT (repeatable)",
    )
    parser.add_argument("--skip-gradcheck", action="store_true", help="skip part 1")
    parser.add_argument("--skip-parity", action="store_true", help="skip part 2")
    parser.add_argument("--skip-features", action="store_true", help="skip part 3")
    parser.add_argument(
        "--no-gradgradcheck", action="store_true", help="first derivatives only (faster)"
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="gradcheck's fast_mode (random projections instead of full Jacobians)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while checking (default 1: the tensors are tiny, and "
        "waking a second thread costs more than the work, very much more on a "
        "busy machine)",
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the full error of every failure"
    )
    args = parser.parse_args(argv)

    cases = [] if args.skip_gradcheck else _select(gradient_cases(), args.only)
    configs = [] if args.skip_parity else _select(parity_configs(), args.only)
    others = [] if args.skip_parity else _select(other_parity_checks(), args.only)
    features = [] if args.skip_features else _select(feature_checks(), args.only)
    if args.list:
        for item in [*cases, *configs, *others, *features]:
            print(item.name)
        return 0

    if not (cases or configs or others or features):
        print("no check matches the selection", file=sys.stderr)
        return 1
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(args.threads, 1))
    try:
        return _run_and_report(args, cases, configs, others, features)
    finally:
        torch.set_num_threads(threads_before)


def _run_and_report(args, cases, configs, others, features) -> int:
    from . import build_info

    print(format_build_summary(build_info()))
    start = time.perf_counter()
    failures: List[Tuple[str, str]] = []
    if cases:
        gradient_results = run_gradient_checks(
            cases, second_order=not args.no_gradgradcheck, fast_mode=args.fast
        )
        print("\n" + format_gradient_table(gradient_results))
        failures += [(r.name, r.detail) for r in gradient_results if not r.passed]
    if configs or others:
        parity_results = run_parity_checks(configs) + run_other_parity_checks(others)
        print("\n" + format_parity_table(parity_results))
        failures += [
            (r.name, r.detail or "error above tolerance") for r in parity_results if not r.passed
        ]
    if features:
        feature_results = run_other_parity_checks(features)
        print("\n" + format_feature_table(feature_results))
        failures += [
            (r.name, r.detail or "error above tolerance") for r in feature_results if not r.passed
        ]
    if not args.skip_features and not transformers_installed():
        print("HuggingFace plug-in: not checked (transformers is not installed)")
    total = len(cases) + len(configs) + len(others) + len(features)
    elapsed = time.perf_counter() - start
    if failures:
        print(f"\n{len(failures)} of {total} checks FAILED ({elapsed:.1f} s):")
        for name, detail in failures:
            print(f"  {name}: {detail if args.verbose else detail.splitlines()[0][:300]}")
        return 1
    print(f"\nall {total} checks passed ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
