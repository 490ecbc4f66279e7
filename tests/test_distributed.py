"""The class-sharded loss (expface_kernels.distributed) on CPU with gloo.

Multi-rank checks run in processes started by torch.multiprocessing.spawn (file://
rendezvous in a temporary directory, so no port is needed). Spawning costs a few
seconds per run on a 2-core machine, so each run performs several checks and writes
its measurements to JSON; the tests here assert on them (a check failing inside a
rank also raises, with its traceback, out of mp.spawn).

The invariant: a backbone in DistributedDataParallel plus the sharded head gives the
same loss, backbone gradients and every row of every shard's weight gradient as one
process training on the concatenated batch with the full weight -- and stays equal
over optimiser steps.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import expface_kernels as ek
from expface_kernels.distributed import (INIT_CHUNK_ROWS, ShardedMarginSoftmaxLoss, init_weight_rows,
                                         reshard, shard_bounds, shard_weight)

HAS_EXT = importlib.util.find_spec("expface_kernels._C") is not None

# float32 acceptance: relative to the largest entry of the compared quantity.
F32_RTOL = 2e-5
F64_RTOL = 1e-12

# (margin, m, margin_grad, reduction, s, dtype, (C, D_in, D, B_local)). Every config is
# checked against one process over 2 optimiser steps. C = 11 and 1001 are divisible by
# neither 2 nor 3; rows 1 and 6 of the global batch are ignored.
SMALL, MEDIUM = (11, 6, 8, 4), (1001, 32, 64, 16)
INVARIANT_CASES = [
    ("expface", None, "exact", "mean", 64.0, torch.float32, SMALL),
    ("arcface", None, "straight_through", "sum", 32.0, torch.float32, SMALL),
    ("cosface", None, "exact", "none", 16.0, torch.float32, SMALL),
    ("expface", None, "exact", "mean", 64.0, torch.float64, SMALL),
    ("expface", 0.6, "exact", "mean", 64.0, torch.float32, MEDIUM),
]


# ---------------------------------------------------------------------------------------
# helpers run inside the ranks
# ---------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both vanish or are empty)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def _problem(world: int, b_local: int, c: int, d_in: int, d: int, seed: int, dtype, ignore=(1, 6)):
    """Global inputs (X (B, d_in), labels (B,) with ignored rows, full weight (C, d))."""
    g = torch.Generator().manual_seed(seed)
    b = world * b_local
    x = torch.randn(b, d_in, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    for i in ignore:
        if i < b:
            y[i] = -1
    w = torch.randn(c, d, generator=g, dtype=torch.float64).mul_(0.01).to(dtype)
    return x, y, w


@torch.no_grad()
def _sgd_step(params, bufs, lr=0.5, momentum=0.9):
    """SGD with momentum by hand: torch.optim imports torch._dynamo (4 s per rank here)."""
    for i, p in enumerate(params):
        bufs[i] = p.grad.clone() if i not in bufs else bufs[i].mul_(momentum).add_(p.grad)
        p.sub_(lr * bufs[i])


def _reduce(loss: torch.Tensor) -> torch.Tensor:
    return loss.mean() if loss.dim() else loss


def _invariant(rank: int, world: int, case, backend: str, steps: int = 2) -> dict:
    """DDP(backbone) + sharded head vs one process on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    margin, m, mg, red, s, dtype, (c, d_in, d, b_local) = case
    x, y, w_full = _problem(world, b_local, c, d_in, d, seed=11, dtype=dtype)
    torch.manual_seed(5)
    backbone = nn.Linear(d_in, d).to(dtype)
    ref_backbone = copy.deepcopy(backbone)
    ref_w = nn.Parameter(w_full.clone())
    ref_params = list(ref_backbone.parameters()) + [ref_w]

    ddp = DDP(backbone)
    head = ShardedMarginSoftmaxLoss(c, d, margin, s=s, m=m, margin_grad=mg, reduction=red,
                                    backend=backend, dtype=dtype)
    head.load_full_weight(w_full)
    assert (head.class_start, head.num_local) == shard_bounds(c, world, rank)
    params = list(ddp.parameters()) + list(head.parameters())
    bufs, ref_bufs = {}, {}
    sl = slice(rank * b_local, (rank + 1) * b_local)
    rows = slice(head.class_start, head.class_start + head.num_local)

    out = {"loss": 0.0, "backbone_grad": 0.0, "head_grad": 0.0, "head_weight": 0.0}
    for _ in range(steps):
        for p in ref_params:
            p.grad = None
        ref_loss = ek.margin_softmax_loss(ref_backbone(x), ref_w, y, margin, s=s, m=m, margin_grad=mg,
                                          reduction=red, backend="reference")
        _reduce(ref_loss).backward()
        for p in params:
            p.grad = None
        loss = head(ddp(x[sl]), y[sl])
        _reduce(loss).backward()
        assert loss.shape == ref_loss.shape
        out["loss"] = max(out["loss"], _rel(loss, ref_loss))
        gb = max(_rel(p.grad, q.grad) for p, q in zip(ddp.module.parameters(), ref_backbone.parameters()))
        out["backbone_grad"] = max(out["backbone_grad"], gb)
        out["head_grad"] = max(out["head_grad"], _rel(head.weight.grad, ref_w.grad[rows]))
        _sgd_step(params, bufs)
        _sgd_step(ref_params, ref_bufs)
        out["head_weight"] = max(out["head_weight"], _rel(head.weight, ref_w[rows]))
    return out


def _all_sampled_classes(head: ShardedMarginSoftmaxLoss) -> list[int]:
    """Global class ids of every rank's last sample, rank order (test-only gather)."""
    mine = (head.sampled_index + head.class_start).tolist()
    if head.world_size == 1:
        return mine
    lists = [None] * head.world_size
    dist.all_gather_object(lists, mine, group=head.group)
    return [c for lst in lists for c in lst]


def _sampling(rank: int, world: int) -> dict:
    """Partial FC: positives kept, counts, gradients only on sampled rows, equality with
    one process on the sampled classes, determinism, sample_rate=0."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # num_local = 30 per rank, B = 12: rate 0.5 keeps a fixed 15 rows (>= B: no host read),
    # rate 0.3 keeps max(9, positives) (a count read), rate 0 the in-batch classes.
    c, d_in, d, b_local = 60, 6, 8, 6
    x, y, w_full = _problem(world, b_local, c, d_in, d, seed=3, dtype=torch.float32, ignore=(2,))
    # Make sure every rank's block holds a positive (for the sample_rate=0 check).
    for r in range(world):
        start, n = shard_bounds(c, world, r)
        y[r] = start + n // 2
    # And a batch whose labels all lie in rank 0's block: with sample_rate=0 every other
    # rank samples no row (an empty block in the autograd.Function).
    y_rank0 = torch.where(y >= 0, y % shard_bounds(c, world, 0)[1], y)
    y_all = y
    sl = slice(rank * b_local, (rank + 1) * b_local)
    out = {}
    for rate, only_rank0 in ((0.5, False), (0.3, False), (0.0, False), (0.0, True)):
        y = y_rank0 if only_rank0 else y_all
        torch.manual_seed(5)
        backbone = nn.Linear(d_in, d)
        ref_backbone = copy.deepcopy(backbone)
        ddp = DDP(backbone)
        head = ShardedMarginSoftmaxLoss(c, d, "arcface", s=32.0, sample_rate=rate, seed=123,
                                        backend="chunked")
        head.load_full_weight(w_full)
        losses = []
        for step in range(2):
            ddp.zero_grad()
            head.zero_grad()
            loss = head(ddp(x[sl]), y[sl])
            loss.backward()
            losses.append(loss.item())
            idx = head.sampled_index
            start, n = head.class_start, head.num_local
            # positives of this block all sampled
            pos = sorted({int(v) - start for v in y.tolist() if start <= v < start + n})
            assert set(pos) <= set(idx.tolist()), (rate, pos, idx.tolist())
            assert idx.tolist() == sorted(set(idx.tolist()))
            k_expected = max(head.num_sample, len(pos))
            assert len(idx) == k_expected, (rate, len(idx), k_expected)
            if rate == 0.0:
                assert idx.tolist() == pos
            if only_rank0 and rank > 0:
                assert len(idx) == 0  # an empty block on this rank
            # gradient only on sampled rows, and on each of them
            nz = (head.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
            assert nz == idx.tolist(), (nz, idx.tolist())
            # equality with one process on the sampled classes
            classes = _all_sampled_classes(head)
            w_sub = nn.Parameter(w_full[classes].clone())
            pos_of = {cl: i for i, cl in enumerate(classes)}
            y_sub = torch.tensor([pos_of[v] if v >= 0 else -1 for v in y.tolist()])
            ref_backbone.zero_grad()
            ref = ek.margin_softmax_loss(ref_backbone(x), w_sub, y_sub, "arcface", s=32.0,
                                         backend="reference")
            ref.backward()
            local_pos = [i for i, cl in enumerate(classes) if start <= cl < start + n]
            key = f"rate{rate}" + ("_rank0_only" if only_rank0 else "")
            out[key + "_loss"] = max(out.get(key + "_loss", 0.0), _rel(loss, ref))
            out[key + "_head_grad"] = max(out.get(key + "_head_grad", 0.0),
                                          _rel(head.weight.grad[idx], w_sub.grad[local_pos]))
            gb = max(_rel(p.grad, q.grad) for p, q in zip(ddp.module.parameters(), ref_backbone.parameters()))
            out[key + "_backbone_grad"] = max(out.get(key + "_backbone_grad", 0.0), gb)
        out[key + "_k"] = len(idx)
        # Determinism: the same seed replays the same draws; another seed differs.
        twins = [ShardedMarginSoftmaxLoss(c, d, "arcface", s=32.0, sample_rate=rate, seed=sd,
                                          backend="chunked") for sd in (123, 123, 124)]
        draws = []
        for t in twins:
            seq = []
            for _ in range(3):
                with torch.no_grad():
                    t(x[sl].float() @ torch.ones(d_in, d), y[sl])
                seq.append(t.sampled_index.tolist())
            draws.append(seq)
        assert draws[0] == draws[1]
        if 0.0 < rate and head.num_sample > len(pos):  # a free choice of negatives exists
            assert draws[0] != draws[2]
    return out


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that read device data on the host (item/bool/int, data-dependent shapes)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "_unique2",
                "unique_consecutive", "repeat_interleave", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNC_OPS:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


def _host_syncs(rank: int, world: int) -> dict:
    """Ops reading device data on the host during forward+backward of the head."""
    c, d, b_local = 40, 8, 4
    x, y, w_full = _problem(world, b_local, c, d, d, seed=9, dtype=torch.float32, ignore=())
    sl = slice(rank * b_local, (rank + 1) * b_local)
    out = {}
    for name, kw in {"model_parallel": dict(sample_rate=1.0),
                     "sampled_static": dict(sample_rate=0.5),
                     "sampled_in_batch": dict(sample_rate=0.0),
                     "validated": dict(sample_rate=1.0, validate=True)}.items():
        kw.setdefault("validate", False)
        head = ShardedMarginSoftmaxLoss(c, d, backend="chunked", seed=1, **kw)
        xe = x[sl].clone().requires_grad_()
        with _SyncCounter() as sc:
            head(xe, y[sl]).backward()
        out[name] = sc.hits
    return out


def _errors(rank: int, world: int) -> dict:
    """A bad label on one rank raises the same ValueError on every rank (no hang)."""
    c, d, b_local = 11, 8, 4
    head = ShardedMarginSoftmaxLoss(c, d, backend="chunked")
    x = torch.randn(b_local, d, requires_grad=True)
    y = torch.zeros(b_local, dtype=torch.long)
    if rank == world - 1:
        y[2] = c  # out of range
    msgs = []
    try:
        head(x, y)
    except ValueError as e:
        msgs.append(str(e))
    # The group still works afterwards: a good step goes through.
    head(x, torch.zeros(b_local, dtype=torch.long)).backward()
    return {"messages": msgs}


def _checkpoint(rank: int, world: int, ckpt_in: str) -> dict:
    """Seeded init is world-size independent; gather to one/all ranks; load a full
    weight saved by another world size."""
    import expface_kernels.distributed as D
    c, d = 11, 8
    head = ShardedMarginSoftmaxLoss(c, d, seed=7, backend="chunked")
    full_ref = init_weight_rows(0, c, d, 7)
    # Every gather lets gloo release its tensors before returning (the exit abort of
    # _await_collective_release): record that each wait ended with Python the sole owner.
    released = []
    wait = D._await_collective_release

    def recording_wait(tensors, *args, **kwargs):
        released.append(wait(tensors, *args, **kwargs))
        return released[-1]

    D._await_collective_release = recording_wait
    g0 = head.gather_weight(dst=0)
    gall = head.gather_weight(dst=None)
    g_last = head.gather_weight(dst=world - 1)
    assert (g0 is None) == (rank != 0) and (g_last is None) == (rank != world - 1)
    assert torch.equal(gall, full_ref)
    if g0 is not None:
        assert torch.equal(g0, full_ref)
    if g_last is not None:
        assert torch.equal(g_last, full_ref)
    # A checkpoint written as 2 shards (another world size) re-sharded onto this one.
    shards2 = torch.load(ckpt_in)
    full2 = torch.cat(shards2, 0)
    head.load_full_weight(full2)
    assert torch.equal(head.weight, shard_weight(full2, world, rank))
    assert torch.equal(head.gather_weight(dst=None), full2)
    D._await_collective_release = wait
    assert released == [True] * 4, released
    return {"ok": True}


def _worker(rank: int, world: int, init: str, out_dir: str, jobs: list) -> None:
    torch.set_num_threads(1)  # 2 cores, 2-3 ranks
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {}
        for job, args in jobs:
            t0 = time.perf_counter()
            if job == "invariant":
                from expface_kernels import backends
                probe = torch.zeros(2, 8)
                res["backend_used"] = backends.select_backend(args["backend"], probe, probe).name
                for i, case in enumerate(INVARIANT_CASES):
                    res[f"invariant{i}"] = _invariant(rank, world, case, args["backend"])
            elif job == "sampling":
                res["sampling"] = _sampling(rank, world)
            elif job == "host_syncs":
                res["host_syncs"] = _host_syncs(rank, world)
            elif job == "errors":
                res["errors"] = _errors(rank, world)
            elif job == "checkpoint":
                res["checkpoint"] = _checkpoint(rank, world, args["ckpt"])
            else:
                raise ValueError(job)
            res.setdefault("seconds", {})[job] = round(time.perf_counter() - t0, 2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


# Ranks start from a forkserver that has imported torch, torch._dynamo (DDP's
# constructor imports it: 4-11 s per rank on 2 cores) and this module once per session,
# instead of each spawned rank importing them again. The forkserver runs no torch op
# before forking, so the children start clean.
mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "expface_kernels.distributed",
                           __name__])


def _run(world: int, tmp_path: Path, jobs: list) -> list[dict]:
    out = tmp_path / f"w{world}"
    out.mkdir()
    mp.start_processes(_worker, args=(world, f"file://{tmp_path}/rdzv_w{world}", str(out), jobs),
                       nprocs=world, join=True, start_method="forkserver")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _check_invariant(results: list[dict], world: int) -> None:
    for i, case in enumerate(INVARIANT_CASES):
        tol = F64_RTOL if case[5] == torch.float64 else F32_RTOL
        for rank, res in enumerate(results):
            for what, err in res[f"invariant{i}"].items():
                assert err <= tol, f"world={world} rank={rank} case={case}: {what} rel err {err:.2e}"


def _ckpt2(tmp_path: Path) -> str:
    """Shards of a seeded 2-rank head, saved as a list (what a 2-rank job would write)."""
    c, d = 11, 8
    shards = [init_weight_rows(*shard_bounds(c, 2, r), d, seed=99) for r in range(2)]
    p = tmp_path / "ckpt2.pt"
    torch.save(shards, p)
    return str(p)


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


def test_two_ranks(tmp_path):
    res = _run(2, tmp_path, [("invariant", {"backend": "chunked"}), ("sampling", {}),
                             ("host_syncs", {}), ("errors", {}),
                             ("checkpoint", {"ckpt": _ckpt2(tmp_path)})])
    _check_invariant(res, 2)
    for rank, r in enumerate(res):
        for k, v in r["sampling"].items():
            if not k.endswith("_k"):
                assert v <= F32_RTOL, f"rank {rank}: sampling {k} rel err {v:.2e}"
        hs = r["host_syncs"]
        assert hs["model_parallel"] == [] and hs["sampled_static"] == [], hs
        assert hs["sampled_in_batch"] == ["_local_scalar_dense"], hs  # the documented count read
        assert len(hs["validated"]) == 1, hs  # the label check's one bool
        assert len(r["errors"]["messages"]) == 1 and "outside [0, 11)" in r["errors"]["messages"][0]
    print(json.dumps(res, indent=1))


def test_three_ranks(tmp_path):
    res = _run(3, tmp_path, [("invariant", {"backend": "reference"}), ("errors", {}),
                             ("checkpoint", {"ckpt": _ckpt2(tmp_path)})])
    _check_invariant(res, 3)
    print(json.dumps(res, indent=1))


@pytest.mark.skipif(not HAS_EXT, reason="expface_kernels._C is not built")
def test_two_ranks_auto_backend(tmp_path):
    res = _run(2, tmp_path, [("invariant", {"backend": "auto"})])
    _check_invariant(res, 2)
    assert res[0]["backend_used"] == "extension", res[0]["backend_used"]


# --- single process, no process group --------------------------------------------------


def test_world_size_one_without_process_group():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    c, d, b = 13, 8, 6
    head = ShardedMarginSoftmaxLoss(c, d, backend="chunked", seed=3)
    assert (head.rank, head.world_size, head.class_start, head.num_local) == (0, 1, 0, c)
    assert head.group is None
    assert torch.equal(head.weight, init_weight_rows(0, c, d, 3))
    x = torch.randn(b, d, requires_grad=True)
    y = torch.tensor([0, 3, -1, 12, 5, 3])
    loss = head(x, y)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    ref = ek.margin_softmax_loss(x2, w2, y, backend="reference")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert _rel(x.grad, x2.grad) < F32_RTOL and _rel(head.weight.grad, w2.grad) < F32_RTOL
    assert torch.equal(head.gather_weight(), head.weight)

    # Sampling in one process: equal to the loss over the sampled classes.
    hs = ShardedMarginSoftmaxLoss(c, d, backend="chunked", seed=3, sample_rate=0.5)
    x.grad = None
    loss = hs(x, y)
    loss.backward()
    idx = hs.sampled_index
    assert set([0, 3, 5, 12]) <= set(idx.tolist()) and len(idx) == 6
    w_sub = hs.weight.detach()[idx].clone().requires_grad_()
    pos = {int(cl): i for i, cl in enumerate(idx)}
    y_sub = torch.tensor([pos[v] if v >= 0 else -1 for v in y.tolist()])
    ref = ek.margin_softmax_loss(x2.detach(), w_sub, y_sub, backend="reference")
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)


def test_explicit_grad_scale_single_process():
    torch.manual_seed(0)
    head = ShardedMarginSoftmaxLoss(7, 4, backend="chunked", embedding_grad_scale=3.0)
    x = torch.randn(5, 4, requires_grad=True)
    head(x, torch.tensor([0, 1, 2, 3, 4])).backward()
    g = x.grad.clone()
    x.grad = None
    ek.margin_softmax_loss(x, head.weight.detach(), torch.tensor([0, 1, 2, 3, 4]),
                           backend="chunked").backward()
    assert torch.allclose(g, 3.0 * x.grad, rtol=1e-6, atol=0)


def test_shard_bounds_and_reshard():
    for c, w in [(11, 2), (11, 3), (10, 5), (7, 7), (1000, 8)]:
        bounds = [shard_bounds(c, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and sum(n for _, n in bounds) == c
        assert all(bounds[r][0] + bounds[r][1] == bounds[r + 1][0] for r in range(w - 1))
        sizes = [n for _, n in bounds]
        assert sizes == [c // w + (r < c % w) for r in range(w)]
    full = init_weight_rows(0, 11, 5, seed=1)
    s2 = [shard_weight(full, 2, r) for r in range(2)]
    s3 = reshard(s2, 3)
    assert [t.shape[0] for t in s3] == [4, 4, 3]
    assert torch.equal(torch.cat(s3), full)
    assert torch.equal(torch.cat(reshard(s3, 2)), full)
    # Shards out of rank order (6 + 5 rows passed as 5 + 6) would permute the classes.
    with pytest.raises(ValueError, match=r"rank order .*\[6, 5\] rows for C=11\), got \[5, 6\]"):
        reshard(s2[::-1], 3)
    with pytest.raises(ValueError, match="2-D"):
        reshard([full[:6], full[6:].flatten()], 3)
    # The seeded init is world-size independent, across chunk boundaries too.
    c = 2 * INIT_CHUNK_ROWS + 17
    big = init_weight_rows(0, c, 3, seed=5)
    for w in (3, 4):
        parts = [init_weight_rows(*shard_bounds(c, w, r), 3, seed=5) for r in range(w)]
        assert torch.equal(torch.cat(parts), big)
    assert abs(big.std().item() - 0.01) < 1e-3


def test_await_collective_release():
    """The wait ends once Python holds the only reference, and gives up after its timeout."""
    import threading

    from expface_kernels.distributed import _await_collective_release
    t = torch.ones(4)
    assert _await_collective_release([t], timeout_s=0.0)
    holder = [t[1:]]  # a view holds a C++ reference to its base: what gloo's work does
    assert not _await_collective_release([t], timeout_s=0.05)  # still held: gives up
    assert holder  # (and nothing let go meanwhile)
    released = threading.Event()

    def let_go():  # the "worker" lets go later (the event first: the wait ends at the clear)
        released.set()
        holder.clear()

    threading.Timer(0.05, let_go).start()
    assert _await_collective_release([t], timeout_s=60.0)
    assert released.is_set()  # it returned because of the release, not before it
    # Not on the CPU (CUDA there): no wait, which would be a host sync.
    assert not _await_collective_release([torch.empty(4, device="meta")], timeout_s=10.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedMarginSoftmaxLoss(10, 4, sample_rate=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        ShardedMarginSoftmaxLoss(0, 4)
    with pytest.raises(ValueError, match="embedding_size"):
        ShardedMarginSoftmaxLoss(10, 0)
    with pytest.raises(ValueError, match="group"):
        ShardedMarginSoftmaxLoss(10, 4, group=object())
    with pytest.raises(ValueError, match="margin"):
        ShardedMarginSoftmaxLoss(10, 4, margin="nope")
    with pytest.raises(ValueError, match="s must be"):
        ShardedMarginSoftmaxLoss(10, 4, s=-1.0)
    with pytest.raises(ValueError, match="backend"):
        ShardedMarginSoftmaxLoss(10, 4, backend="nope")
    with pytest.raises(ValueError, match="num_classes must be an int >= world_size"):
        shard_bounds(2, 3, 0)
    head = ShardedMarginSoftmaxLoss(10, 4, backend="chunked")
    with pytest.raises(ValueError, match="local_embeddings"):
        head(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="local_labels"):
        head(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="local_labels"):
        head(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
        head(torch.randn(3, 4), torch.tensor([0, 10, -1]))
    with pytest.raises(ValueError, match="full_weight"):
        head.load_full_weight(torch.zeros(9, 4))


def _env_with_repo(root: Path) -> dict:
    """os.environ with the repository root on PYTHONPATH (works without an install too)."""
    paths = [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def test_example_train_sharded_torchrun():
    """examples/train_sharded.py under torchrun (2 ranks, gloo): the loss falls."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = _env_with_repo(root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "examples" / "train_sharded.py"), "--steps", "100", "--backend", "chunked"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"loss ([\d.]+) -> ([\d.]+) in 100 steps", p.stdout)
    assert m, p.stdout
    first, last = map(float, m.groups())
    assert last < 0.7 * first, p.stdout


_CUDA_SYNC_SCRIPT = r"""
import json, warnings
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import expface_kernels as ek
import expface_kernels.distributed as D

# Rank 0 of a fake 2-rank group: collectives are no-ops, so stand in device-only copies
# for the gathers (NCCL's are asynchronous device work too) to keep the labels valid.
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
D._all_gather_single = lambda out, inp, group=None, **k: out.copy_(torch.cat([inp, inp]))
D._reduce_scatter_single = lambda out, inp, op=None, group=None, **k: out.copy_(inp[:out.shape[0]])
res = {}
for be in [n for n, why in ek.available_backends("cuda").items() if why is None]:
    for name, kw in {"model_parallel": dict(validate=False),
                     "sampled_static": dict(validate=False, sample_rate=0.5),
                     "validated": dict(validate=True),
                     "in_batch": dict(validate=False, sample_rate=0.0)}.items():
        head = D.ShardedMarginSoftmaxLoss(4096, 128, backend=be, device="cuda", seed=0, **kw)
        x = torch.randn(64, 128, device="cuda", requires_grad=True)
        y = torch.randint(0, 4096, (64,), device="cuda")
        head(x, y).backward()  # warm-up: compilation and lazy initialisation may sync
        torch.cuda.synchronize()
        x.grad = head.weight.grad = None
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            head(x, y).backward()
        torch.cuda.set_sync_debug_mode("default")
        res[be + "/" + name] = [str(m.message)[:80] for m in w if "synchroniz" in str(m.message)]
print("RESULT" + json.dumps(res))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_cuda():
    """torch.cuda.set_sync_debug_mode over one step of rank 0 of a fake 2-rank group."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = _env_with_repo(root)
    p = subprocess.run([sys.executable, "-c", _CUDA_SYNC_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    print(json.dumps(res, indent=1))
    for key, syncs in res.items():
        be, case = key.split("/")
        if case in ("model_parallel", "sampled_static"):
            assert syncs == [], (key, syncs)
        elif case == "validated":
            assert len(syncs) == 1, (key, syncs)  # the label check's one bool
        else:
            assert len(syncs) >= 1, (key, syncs)  # the documented count read
