"""Variable-length batches: the jagged path (ops.attention_varlen on packed sequences) against
padding, ours and torch's, forward and forward+backward, in one process.

A batch of 32 sequences with lengths drawn uniformly in [16, 512] (fixed seed), H 8, D 64,
float32, self-attention (L_b = S_b), not causal unless --causal. Compared, interleaved, median
of repeated runs:
  varlen         ops.attention_varlen on the packed (total, H, D) tensors with offsets;
  ours padded    ops.attention on (B, H, L_max, D) with key_padding_mask;
  torch padded   F.scaled_dot_product_attention on (B, H, L_max, D) with a (B, 1, 1, L_max)
                 bool mask;
  torch jagged   F.scaled_dot_product_attention on jagged (B, H, j, D) nested tensors.
Ratios are (other time) / (varlen time): above 1, varlen is faster. Also reported: the useful
attention work's GFLOP/s (4 * H * D * sum L_b^2 forward, 3.5x that for forward+backward),
against one GEMM's rate measured in the same run.

Run: python benchmarks/bench_varlen.py [--batch 32] [--reps 7] [--causal]
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import gemm_rate  # noqa: E402


def median_times(fns, reps):
    """Median seconds of each function, interleaved, the order rotated every repetition."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=g)
    B, H, D, L_max = args.batch, args.heads, args.head_dim, int(lengths.max())
    total = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    q, k, v = (torch.randn(total, H, D, generator=g) for _ in range(3))

    # Padded copies (B, H, L_max, D): each sequence's rows, zeros after its end.
    def padded(t):
        out = t.new_zeros(B, L_max, H, D)
        for b in range(B):
            out[b, : lengths[b]] = t[cu[b] : cu[b + 1]]
        return out.transpose(1, 2).contiguous()

    qp, kp, vp = padded(q), padded(k), padded(v)
    valid = torch.arange(L_max)[None, :] < lengths[:, None]  # (B, L_max), True = a real key
    torch_mask = valid[:, None, None, :]
    jagged = [torch.nested.nested_tensor_from_jagged(t, cu).transpose(1, 2) for t in (q, k, v)]

    def varlen(q, k, v):
        return ops.attention_varlen(q, k, v, cu, cu, L_max, L_max, is_causal=args.causal)

    def ours_padded(q, k, v):
        return ops.attention(q, k, v, is_causal=args.causal, key_padding_mask=valid)

    def torch_padded(q, k, v):
        mask = (
            torch_mask & torch.ones(L_max, L_max, dtype=torch.bool).tril()
            if args.causal
            else torch_mask
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def torch_jagged(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def values_of(out):
        return out.transpose(1, 2).values() if out.is_nested else out

    inputs = {
        "varlen": (q, k, v),
        "ours padded": (qp, kp, vp),
        "torch padded": (qp, kp, vp),
        "torch jagged": tuple(jagged),
    }
    functions = {
        "varlen": varlen,
        "ours padded": ours_padded,
        "torch padded": torch_padded,
        "torch jagged": torch_jagged,
    }

    def forward(name):
        return lambda: functions[name](*inputs[name])

    def forward_backward(name):
        if name == "torch jagged":
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            nested = [torch.nested.nested_tensor_from_jagged(t, cu).transpose(1, 2) for t in leaves]

            def run():
                values_of(torch_jagged(*nested)).sum().backward(retain_graph=True)

            return run
        leaves = [t.clone().requires_grad_() for t in inputs[name]]
        return lambda: functions[name](*leaves).sum().backward()

    work = 4.0 * H * D * float((lengths.double() ** 2).sum()) / (2 if args.causal else 1)
    rate = gemm_rate(torch.float32)
    print(
        f"qkv_attention {qkv_attention.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, kernel level "
        f"{qkv_attention.build_info().get('kernel_isa')}, GEMM {rate:.0f} GFLOP/s (float32)"
    )
    print(
        f"B {B}, H {H}, D {D}, lengths {args.min_len}..{args.max_len} (seed 0): "
        f"sum {total}, max {L_max}; padding makes {B * L_max**2 / float((lengths.double() ** 2).sum()):.2f}x "
        f"the scores; causal {args.causal}; median of {args.reps}"
    )
    for mode, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = median_times({name: make(name) for name in functions}, args.reps)
        flops = work * (3.5 if mode == "fwd+bwd" else 1.0)
        base = times["varlen"]
        print(
            f"{mode:8s} varlen {base * 1e3:8.2f} ms ({flops / base / 1e9:6.1f} GFLOP/s, "
            f"{100 * flops / base / 1e9 / rate:4.1f}% of GEMM)"
        )
        for name in ("ours padded", "torch padded", "torch jagged"):
            print(
                f"{'':8s} {name:13s} {times[name] * 1e3:8.2f} ms  "
                f"-> varlen {times[name] / base:5.2f}x faster"
            )

    # The numbers compared are the same computation: check it once.
    out = varlen(q, k, v)
    ref = ours_padded(qp, kp, vp).transpose(1, 2)  # (B, L_max, H, D)
    ref = torch.cat([ref[b, : lengths[b]] for b in range(B)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    main()
