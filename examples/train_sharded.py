"""Train a small model with the class-sharded ExpFace head on CPU (gloo), synthetic data.

    torchrun --nproc_per_node=2 examples/train_sharded.py            # model parallel head
    torchrun --nproc_per_node=2 examples/train_sharded.py --sample-rate 0.3   # Partial FC

The backbone (an MLP) is data parallel under DistributedDataParallel; the head's
class centres are split over the ranks (ShardedMarginSoftmaxLoss) and stay out of DDP.
Data: ``--classes`` Gaussian clusters in ``--in-dim`` dimensions; each rank draws its
own batch of ``--batch`` rows per step. Rank 0 prints the loss (the global-batch loss,
the same on every rank) and, at the end, saves the gathered full head weight if
``--save`` is given.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from expface_kernels.distributed import ShardedMarginSoftmaxLoss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1001, help="C (odd by default: uneven shards)")
    ap.add_argument("--in-dim", type=int, default=32)
    ap.add_argument("--emb-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128, help="rows per rank per step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--sample-rate", type=float, default=1.0)
    ap.add_argument("--margin", default="expface")
    ap.add_argument("--s", type=float, default=32.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="path for the gathered (C, D) head weight")
    args = ap.parse_args()

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without it, run alone.
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # Same data distribution and backbone init on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(args.seed)
    centres = torch.randn(args.classes, args.in_dim)
    backbone = nn.Sequential(nn.Linear(args.in_dim, 256), nn.ReLU(), nn.Linear(256, args.emb_dim))
    model = DDP(backbone) if world > 1 else backbone
    head = ShardedMarginSoftmaxLoss(args.classes, args.emb_dim, args.margin, s=args.s,
                                    sample_rate=args.sample_rate, backend=args.backend,
                                    seed=args.seed)
    # The head's shard is this rank's own parameter: give it to the optimiser, not to DDP.
    opt = torch.optim.SGD([{"params": model.parameters(), "weight_decay": 5e-4},
                           {"params": head.parameters()}], lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"world={world} classes={args.classes} global batch={world * args.batch} "
              f"sample_rate={args.sample_rate}; rank 0 holds classes "
              f"[{head.class_start}, {head.class_start + head.num_local})", flush=True)

    g = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its own batches
    t0 = time.perf_counter()
    first = last = None
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, args.classes, (args.batch,), generator=g)
        x = centres[labels] + 0.5 * torch.randn(args.batch, args.in_dim, generator=g)
        loss = head(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1:
            first = loss.item()
        if step % 25 == 0 or step == 1:
            last = loss.item()
            if rank == 0:
                print(f"step {step:4d}  loss {last:8.4f}  ({time.perf_counter() - t0:5.1f} s)", flush=True)

    full = head.gather_weight(dst=0)  # collective: every rank calls it
    if rank == 0:
        print(f"loss {first:.4f} -> {last:.4f} in {args.steps} steps "
              f"({time.perf_counter() - t0:.1f} s); gathered head weight {tuple(full.shape)}", flush=True)
        if args.save:
            torch.save(full, args.save)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
