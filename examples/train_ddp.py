"""Trains the demo's reversal Transformer (qkv_attention.MultiheadAttention) with torch's
DistributedDataParallel, gloo backend, on CPU.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py
    python examples/train_ddp.py          # one process, no DDP: the same training, whole batch

Every step all ranks draw the same global batch (the same seeded generator) and each trains on
its own equal slice. DDP averages the gradients across ranks, so each step's update is the
single-process update on the whole global batch, and all ranks hold identical parameters
throughout. tests/python/integrations/test_ddp.py checks exactly that, in float64, with --save.

Under torchrun each process runs one torch thread (torchrun sets OMP_NUM_THREADS=1), so two
processes share a 2-core machine without oversubscribing it.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qkv_attention
from reversal_transformer import ReversalTransformer, loss_and_accuracy, make_batch

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--global-batch",
        type=int,
        default=64,
        help="sequences per step over all ranks (a multiple of the world size)",
    )
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        help="write the final state_dict here; '{rank}' in the name is replaced "
        "by the rank (otherwise only rank 0 writes)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group(backend="gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if args.global_batch % world_size != 0:
        raise SystemExit(
            f"--global-batch {args.global_batch} is not a multiple of the world size {world_size}"
        )
    shard = args.global_batch // world_size

    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(args.seed)
    model = ReversalTransformer(
        qkv_attention.MultiheadAttention,
        vocab_size=args.vocab,
        length=args.length,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        ff_dim=args.ff_dim,
        dtype=getattr(torch, args.dtype),
    )
    trained = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.steps, 1))
    generator = torch.Generator().manual_seed(args.seed + 1)  # the global batch stream

    if rank == 0:
        print(
            f"training on {world_size} process(es), {shard} of {args.global_batch} sequences "
            f"each per step, {torch.get_num_threads()} thread(s) per process"
        )
    steps = range(args.steps)
    show_progress = rank == 0 and tqdm is not None and not args.no_progress
    if show_progress:
        steps = tqdm(steps, desc=f"DDP x{world_size}", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    for step in steps:
        inputs, targets = make_batch(generator, args.global_batch, args.length, args.vocab)
        mine = slice(rank * shard, (rank + 1) * shard)  # this rank's slice of the global batch
        loss, accuracy, _ = loss_and_accuracy(trained(inputs[mine]), targets[mine])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        optimizer.step()
        scheduler.step()
        if show_progress and (step % 10 == 0 or step == args.steps - 1):
            steps.set_postfix(loss=f"{loss.item():.4f}", acc=f"{accuracy.item():.3f}")
    elapsed = time.perf_counter() - started

    # Held-out accuracy, measured on rank 0's copy (all copies are identical).
    if rank == 0:
        model.eval()
        with torch.no_grad():
            inputs, targets = make_batch(
                torch.Generator().manual_seed(args.seed + 2), 1024, args.length, args.vocab
            )
            loss, accuracy, sequence_accuracy = loss_and_accuracy(model(inputs), targets)
        print(
            f"done in {elapsed:.1f} s ({1000 * elapsed / max(args.steps, 1):.1f} ms/step): "
            f"held-out loss {loss.item():.4g}, token accuracy {100 * accuracy.item():.2f}%, "
            f"sequence accuracy {100 * sequence_accuracy.item():.2f}%"
        )
    if args.save is not None and ("{rank}" in str(args.save) or rank == 0):
        path = Path(str(args.save).replace("{rank}", str(rank)))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    if distributed:
        # Each backward stashes a Python object in the thread-local state that gloo's
        # all-reduce work captures, and a gloo worker thread frees that work (taking the GIL)
        # a moment after it completes. A rank that exits at once can reach interpreter
        # shutdown first, and the worker then aborts the process ("terminate called without
        # an active exception"). Waiting here with the GIL released lets the workers finish.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
