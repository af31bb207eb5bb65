"""Trains a small Transformer on sequence reversal with qkv_attention's MultiheadAttention, next to
a twin built on torch.nn.MultiheadAttention, and shows what attention learned.

    python examples/train_transformer.py                 # what `make demo` runs
    python examples/train_transformer.py --steps 50 --out /tmp/quick

The twins start from the same weights (the torch twin's state_dict is loaded into ours), have no
dropout, and each step both take one SGD step on the same batch, so any difference between
them comes from floating-point rounding in the attention code alone. Their step times are
measured alternately (ours first on even steps, torch's first on odd ones) so that load from
other processes affects both alike.

Writes to --out (default demo_out/): attention.png (per-head attention weights for a sample
input), loss.png (both loss curves) and report.md (the numbers printed at the end).
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

import qkv_attention
from reversal_transformer import (
    ReversalTransformer,
    loss_and_accuracy,
    make_batch,
    max_parameter_difference,
    token_names,
)

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety; training works without it
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=12, help="sequence length")
    parser.add_argument("--vocab", type=int, default=16, help="number of letters (at most 26)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=2048, help="held-out sequences")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    # One thread by default: this model's matrices are tiny (64 x 64), so a second thread gains
    # little, and on a machine busy with other work each op's thread hand-off can cost more
    # than the op (we measured 25 ms/step on 1 thread against 200 ms/step on 2 under load).
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)"
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@dataclass
class TwinHistory:
    """Per-step losses and step times of both twins."""

    loss: Dict[str, List[float]] = field(default_factory=lambda: {"ours": [], "torch": []})
    seconds: Dict[str, List[float]] = field(default_factory=lambda: {"ours": [], "torch": []})
    parameter_difference: List[float] = field(default_factory=list)  # after each step

    def ms_per_step(self, name: str) -> float:
        """Median, in milliseconds: robust to the odd step slowed by another process."""
        return 1000 * statistics.median(self.seconds[name])


def build_twins(args) -> Dict[str, nn.Module]:
    dtype = getattr(torch, args.dtype)
    shape = dict(
        vocab_size=args.vocab,
        length=args.length,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        ff_dim=args.ff_dim,
        dtype=dtype,
    )
    torch.manual_seed(args.seed)
    theirs = ReversalTransformer(nn.MultiheadAttention, **shape)
    ours = ReversalTransformer(qkv_attention.MultiheadAttention, **shape)
    ours.load_state_dict(theirs.state_dict())  # the same initial weights, whatever the init
    return {"ours": ours, "torch": theirs}


def train(twins: Dict[str, nn.Module], args) -> TwinHistory:
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        for name, model in twins.items()
    }
    # One learning rate schedule for both: cosine decay to 0 settles the final weights.
    schedulers = {
        name: torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
        for name, opt in optimizers.items()
    }
    generator = torch.Generator().manual_seed(args.seed + 1)
    history = TwinHistory()
    steps = range(args.steps)
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = steps = tqdm(steps, desc="training both twins", unit="step", dynamic_ncols=True)
    for step in steps:
        inputs, targets = make_batch(generator, args.batch_size, args.length, args.vocab)
        order = ["ours", "torch"] if step % 2 == 0 else ["torch", "ours"]
        for name in order:
            model, optimizer = twins[name], optimizers[name]
            start = time.perf_counter()
            loss, _, _ = loss_and_accuracy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.seconds[name].append(time.perf_counter() - start)
            history.loss[name].append(loss.item())
            schedulers[name].step()
        history.parameter_difference.append(max_parameter_difference(twins["ours"], twins["torch"]))
        if bar is not None and (step % 10 == 0 or step == args.steps - 1):
            recent = lambda name: 1000 * statistics.median(history.seconds[name][-50:])
            bar.set_postfix(
                loss=f"{history.loss['ours'][-1]:.4f}",
                torch_loss=f"{history.loss['torch'][-1]:.4f}",
                ms_ours=f"{recent('ours'):.1f}",
                ms_torch=f"{recent('torch'):.1f}",
            )
    return history


@torch.no_grad()
def evaluate(twins: Dict[str, nn.Module], args) -> Dict[str, Dict[str, float]]:
    generator = torch.Generator().manual_seed(args.seed + 2)  # sequences never trained on
    inputs, targets = make_batch(generator, args.eval_size, args.length, args.vocab)
    results = {}
    for name, model in twins.items():
        model.eval()
        logits, weights = model(inputs, need_weights=True)
        loss, token_accuracy, sequence_accuracy = loss_and_accuracy(logits, targets)
        results[name] = {
            "loss": loss.item(),
            "token_accuracy": token_accuracy.item(),
            "sequence_accuracy": sequence_accuracy.item(),
            "reversal_attention": [reversal_attention(w) for w in weights],
        }
    return results


def reversal_attention(weights) -> List[float]:
    """Per head: the mean weight that query i gives to key L-1-i, the key holding the letter
    it must output. (B, H, L, L) -> H numbers in [0, 1]; 1 is a perfect anti-diagonal."""
    anti_diagonal = weights.flip(-1).diagonal(dim1=-2, dim2=-1)  # (B, H, L): w[..., i, L-1-i]
    return anti_diagonal.mean(dim=(0, 2)).tolist()


@torch.no_grad()
def sample_attention(model: nn.Module, args):
    """A fixed sample input, the model's prediction and its per-layer (H, L, L) weights."""
    generator = torch.Generator().manual_seed(args.seed + 3)
    tokens, _ = make_batch(generator, 1, args.length, args.vocab)
    logits, weights = model(tokens, need_weights=True)
    return tokens[0], logits[0].argmax(-1), [w[0].float() for w in weights]


def plot_attention(tokens, predicted, weights, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = len(weights), weights[0].size(0)
    length = tokens.numel()
    inputs = token_names(tokens)
    outputs = token_names(predicted)
    cell = 0.26  # inches per token: keeps the letters legible at any length
    size = max(2.6, cell * length + 1.0)
    fig, axes = plt.subplots(
        layers,
        heads,
        figsize=(size * heads + 1.2, size * layers + 1.3),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer][head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=11)
            ticks = range(length)
            ax.set_xticks(ticks, [f"{t}" for t in inputs], fontsize=8)
            ax.set_yticks(ticks, [f"{i}:{t}" for i, t in enumerate(outputs)], fontsize=8)
            ax.set_xlabel("input letter (key)", fontsize=9)
            if head == 0:
                ax.set_ylabel("output position:letter (query)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.7, pad=0.01, aspect=30, label="attention weight")
    fig.suptitle(
        f"qkv_attention.MultiheadAttention after training on reversal of \"{''.join(inputs)}\"\n"
        f"(model output \"{''.join(outputs)}\"; output i must read input {length - 1}-i: "
        "the anti-diagonal)",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(history: TwinHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history.loss["ours"]) + 1)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(8, 6.5),
        sharex=True,
        gridspec_kw={"height_ratios": [2, 1]},
        constrained_layout=True,
    )
    top.plot(
        steps,
        history.loss["torch"],
        color="tab:orange",
        linewidth=3,
        alpha=0.6,
        label="torch.nn.MultiheadAttention",
    )
    top.plot(
        steps,
        history.loss["ours"],
        color="tab:blue",
        linewidth=1.2,
        linestyle="--",
        label="qkv_attention.MultiheadAttention",
    )
    top.set_yscale("log")
    top.set_ylabel("training loss (cross-entropy)")
    top.set_title("Sequence reversal: the two twins, same initial weights, same batches")
    top.grid(True, which="both", alpha=0.3)
    top.legend()
    # Exact zeros have no place on a log axis: they are left out (NaN) rather than faked.
    nonzero = lambda values: [v if v > 0 else float("nan") for v in values]
    loss_difference = [abs(a - b) for a, b in zip(history.loss["ours"], history.loss["torch"])]
    bottom.plot(
        steps,
        nonzero(history.parameter_difference),
        color="black",
        linewidth=1.5,
        label="largest parameter difference",
    )
    bottom.plot(
        steps,
        nonzero(loss_difference),
        ".",
        color="tab:gray",
        markersize=2.5,
        label="|loss ours - loss torch|",
    )
    bottom.set_yscale("log")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("twin difference")
    bottom.set_title("How far apart the twins are (float rounding only)", fontsize=10)
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(fontsize=8, loc="center right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: Path, args, results, history, parameter_difference, total_seconds):
    ours_ms, torch_ms = history.ms_per_step("ours"), history.ms_per_step("torch")
    lines = [
        "# qkv_attention demo: sequence reversal",
        "",
        f"A {args.layers}-layer Transformer (d_model {args.d_model}, {args.heads} heads, "
        f"length {args.length}, {args.vocab} letters, {args.dtype}) trained for {args.steps} "
        f"SGD steps of batch {args.batch_size}, once with `qkv_attention.MultiheadAttention` and "
        "once with `torch.nn.MultiheadAttention`, from the same initial weights on the same "
        f"batches. Evaluated on {args.eval_size} held-out sequences.",
        "",
        "| | qkv_attention | torch |",
        "|---|---|---|",
        f"| final loss (held-out) | {results['ours']['loss']:.3g} "
        f"| {results['torch']['loss']:.3g} |",
        f"| token accuracy | {100 * results['ours']['token_accuracy']:.2f}% "
        f"| {100 * results['torch']['token_accuracy']:.2f}% |",
        f"| whole-sequence accuracy | {100 * results['ours']['sequence_accuracy']:.2f}% "
        f"| {100 * results['torch']['sequence_accuracy']:.2f}% |",
        f"| ms per training step (median) | {ours_ms:.2f} | {torch_ms:.2f} |",
        "",
        "- attention on the expected key (query i on input L-1-i), mean over the held-out "
        "sequences, per head (qkv_attention twin):",
        *[
            f"  - layer {layer + 1}: " + ", ".join(f"{100 * share:.1f}%" for share in shares)
            for layer, shares in enumerate(results["ours"]["reversal_attention"])
        ],
        f"- largest parameter difference between the twins: {parameter_difference:.3g}",
        f"- step time ratio ours / torch: {ours_ms / torch_ms:.3f} "
        f"(torch / ours: {torch_ms / ours_ms:.3f})",
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}; "
        f"run took {total_seconds:.0f} s",
        "",
        "![attention weights](attention.png)",
        "",
        "![loss curves](loss.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    twins = build_twins(args)
    print(
        f"twins built: {sum(p.numel() for p in twins['ours'].parameters())} parameters each, "
        f"largest initial difference {max_parameter_difference(twins['ours'], twins['torch'])}"
    )
    history = train(twins, args)
    results = evaluate(twins, args)
    parameter_difference = max_parameter_difference(twins["ours"], twins["torch"])

    tokens, predicted, weights = sample_attention(twins["ours"], args)
    plot_attention(tokens, predicted, weights, args.out / "attention.png")
    plot_losses(history, args.out / "loss.png")
    total_seconds = time.perf_counter() - started
    write_report(
        args.out / "report.md", args, results, history, parameter_difference, total_seconds
    )

    ours_ms, torch_ms = history.ms_per_step("ours"), history.ms_per_step("torch")
    print(
        f"sample: input {''.join(token_names(tokens))} -> output {''.join(token_names(predicted))}"
    )
    for name, label in (("ours", "qkv_attention"), ("torch", "torch        ")):
        r = results[name]
        print(
            f"{label}: loss {r['loss']:.4g}, token accuracy {100 * r['token_accuracy']:.2f}%, "
            f"sequence accuracy {100 * r['sequence_accuracy']:.2f}%, "
            f"{history.ms_per_step(name):.2f} ms/step"
        )
    best = [max(shares) for shares in results["ours"]["reversal_attention"]]
    print(
        "attention on the expected key (input L-1-i), best head per layer: "
        + ", ".join(f"{100 * share:.1f}%" for share in best)
    )
    print(f"largest parameter difference between the twins: {parameter_difference:.3g}")
    print(f"ms/step ratio ours/torch: {ours_ms / torch_ms:.3f}")
    print(
        f"wrote {args.out / 'attention.png'}, {args.out / 'loss.png'}, "
        f"{args.out / 'report.md'} ({total_seconds:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
