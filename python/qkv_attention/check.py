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

The exit code is 0 when every check passes and 1 otherwise, so the tool can gate a script.
The cases live in ``qkv_attention._cases`` (the tests run them too); this module runs and reports
them. It depends on the installed package only (not on the repository's tests or examples).
"""

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _cases, functional
from ._cases import GradientCase, ParityConfig, gradient_cases, parity_configs

__all__ = [
    "main",
    "gradient_cases",
    "parity_configs",
    "other_parity_checks",
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
    gradient_error: float
    tolerance: Tuple[float, float]
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return (
            not self.detail
            and self.output_error <= self.tolerance[0]
            and self.gradient_error <= self.tolerance[1]
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
    """A comparison with torch that is not a MultiheadAttention configuration.

    ``compare()`` returns (max output error, max gradient error); float64 tolerances apply.
    """

    name: str
    compare: Callable[[], Tuple[float, float]]


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
                _cases.TOLERANCES[_cases.F64],
                time.perf_counter() - start,
                detail,
            )
        )
    return results


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
    return _table(["operator case (float64)", "gradcheck", "gradgradcheck", "s", "result"], rows)


def format_parity_table(results: Sequence[ParityResult]) -> str:
    def number(x: float) -> str:
        return "inf" if math.isinf(x) else f"{x:.1e}"

    rows = [
        [
            r.name,
            number(r.output_error),
            number(r.gradient_error),
            f"{r.tolerance[0]:.0e}/{r.tolerance[1]:.0e}",
            "pass" if r.passed else "FAIL",
        ]
        for r in results
    ]
    return _table(
        [
            "configuration (ours vs torch, same inputs)",
            "max output err",
            "max grad err",
            "tolerance",
            "result",
        ],
        rows,
    )


def _select(items, patterns: Optional[Sequence[str]]):
    if not patterns:
        return list(items)
    return [item for item in items if any(p.lower() in item.name.lower() for p in patterns)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qkv_attention.check",
        description="gradcheck/gradgradcheck of every qkv_attention operator and parity of "
        "qkv_attention.MultiheadAttention with torch.nn.MultiheadAttention. "
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
    if args.list:
        for item in [*cases, *configs, *others]:
            print(item.name)
        return 0

    if not (cases or configs or others):
        print("no check matches the selection", file=sys.stderr)
        return 1
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(args.threads, 1))
    try:
        return _run_and_report(args, cases, configs, others)
    finally:
        torch.set_num_threads(threads_before)


def _run_and_report(args, cases, configs, others) -> int:
    from . import build_info

    print(f"qkv_attention.check: torch {torch.__version__}, threads: {torch.get_num_threads()}")
    print(f"build: {build_info()}")
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
    total = len(cases) + len(configs) + len(others)
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
