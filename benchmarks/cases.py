"""The benchmark cases: what each one runs for us and for torch.

Shared by bench_attention.py (timings, in one process) and memory_child.py (peak memory, one
case per process), so that both measure exactly the same work.
"""

import dataclasses
import math
import statistics
import time
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

import qkv_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "op" (attention op vs F.scaled_dot_product_attention) or "module"
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str
    batch: int
    heads: int
    length: int  # L = S
    head_dim: int = 64
    causal: bool = False
    dropout: float = 0.0
    need_weights: bool = False  # module only

    @property
    def embed_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def name(self) -> str:
        parts = [
            self.kind,
            self.mode,
            self.dtype,
            f"B{self.batch}",
            f"H{self.heads}",
            f"L{self.length}",
        ]
        if self.kind == "op":
            parts.append(f"D{self.head_dim}")
        else:
            parts.append(f"E{self.embed_dim}")
        if self.causal:
            parts.append("causal")
        parts.append(f"p{self.dropout:g}")
        if self.kind == "module":
            parts.append(f"weights={int(self.need_weights)}")
        return " ".join(parts)

    def attention_flops(self) -> float:
        """Attention FLOPs: 4·B·H·L·S·D forward (halved when causal), 3.5x for fwd+bwd."""
        flops = 4.0 * self.batch * self.heads * self.length * self.length * self.head_dim
        if self.causal:
            flops /= 2
        return flops * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), name=self.name, embed_dim=self.embed_dim)

    @staticmethod
    def from_json(data: dict) -> "Case":
        fields = {f.name for f in dataclasses.fields(Case)}
        return Case(**{k: v for k, v in data.items() if k in fields})


def _op_runners(case: Case) -> Tuple[Callable[[], None], Callable[[], None]]:
    dtype = DTYPES[case.dtype]
    shape = (case.batch, case.heads, case.length, case.head_dim)
    grad = case.mode == "fwd+bwd"
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3))
    grad_out = torch.randn(shape, dtype=dtype)

    def ours():
        out = qkv_attention.ops.attention(q, k, v, None, case.dropout, case.causal)
        if grad:
            torch.autograd.grad(out, (q, k, v), grad_out)

    def theirs():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=case.dropout, is_causal=case.causal)
        if grad:
            torch.autograd.grad(out, (q, k, v), grad_out)

    return ours, theirs


def _module_runners(case: Case) -> Tuple[Callable[[], None], Callable[[], None]]:
    dtype = DTYPES[case.dtype]
    E = case.embed_dim
    torch.manual_seed(0)
    theirs_module = torch.nn.MultiheadAttention(
        E, case.heads, dropout=case.dropout, batch_first=True, dtype=dtype
    )
    ours_module = qkv_attention.MultiheadAttention(
        E, case.heads, dropout=case.dropout, batch_first=True, dtype=dtype
    )
    ours_module.load_state_dict(theirs_module.state_dict())
    theirs_module.train(), ours_module.train()
    grad = case.mode == "fwd+bwd"
    x = torch.randn(case.batch, case.length, E, dtype=dtype, requires_grad=grad)
    mask = None
    if case.causal:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(case.length, dtype=dtype)

    def run(module):
        def step():
            with torch.set_grad_enabled(grad):
                out, weights = module(
                    x, x, x, need_weights=case.need_weights, attn_mask=mask, is_causal=case.causal
                )
                if grad:
                    loss = out.float().sum()
                    if weights is not None:
                        # The weights take part in the loss, as when a model uses them.
                        loss = loss + weights.float().sum()
                    loss.backward()

        return step

    return run(ours_module), run(theirs_module)


def runners(case: Case) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(ours, torch's) zero-argument callables running the case once."""
    if case.kind == "op":
        return _op_runners(case)
    return _module_runners(case)


def gemm_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of one n x n x n torch.mm, the best of a few runs."""
    import time

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def op_cases(
    lengths,
    dtypes=("float32", "bfloat16"),
    modes=("fwd", "fwd+bwd"),
    dropouts=(0.0, 0.1),
    causals=(False, True),
):
    """Op cases; B·H shrinks as L grows so that every case is a comparable amount of work."""
    batch_heads = {
        128: (16, 8),
        256: (8, 8),
        512: (4, 8),
        1024: (2, 8),
        2048: (1, 8),
        4096: (1, 4),
        8192: (1, 2),
    }
    cases = []
    for length in lengths:
        batch, heads = batch_heads.get(length, (1, 4))
        for dtype in dtypes:
            for mode in modes:
                for causal in causals:
                    for dropout in dropouts:
                        cases.append(
                            Case("op", mode, dtype, batch, heads, length, 64, causal, dropout)
                        )
    return cases


def module_cases(
    dtypes=("float32",),
    modes=("fwd", "fwd+bwd"),
    dropouts=(0.0, 0.1),
    weights=(False, True),
    batch=4,
    length=512,
    heads=8,
    head_dim=64,
):
    cases = []
    for dtype in dtypes:
        for mode in modes:
            for dropout in dropouts:
                for need_weights in weights:
                    cases.append(
                        Case(
                            "module",
                            mode,
                            dtype,
                            batch,
                            heads,
                            length,
                            head_dim,
                            False,
                            dropout,
                            need_weights,
                        )
                    )
    return cases


def describe_machine() -> dict:
    import os
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return dict(
        cpu=model,
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        avx512="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        torch=torch.__version__,
        python=platform.python_version(),
        load_average=os.getloadavg(),
    )


def interleaved_medians(ours: Callable[[], None], theirs: Callable[[], None], reps: int):
    """Median seconds of ours and of theirs over `reps` runs each, after one warm-up of each,
    run interleaved with the order alternating (ours, theirs, theirs, ours, ...)."""
    ours()
    theirs()
    times = {"ours": [], "theirs": []}
    for rep in range(reps):
        order = [("ours", ours), ("theirs", theirs)]
        if rep % 2:
            order.reverse()
        for who, fn in order:
            t0 = time.perf_counter()
            fn()
            times[who].append(time.perf_counter() - t0)
    return statistics.median(times["ours"]), statistics.median(times["theirs"])
