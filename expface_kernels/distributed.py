"""Class-sharded margin-softmax loss over ``torch.distributed`` (model parallel + Partial FC).

Layout
------
The C class centres are split in contiguous blocks over the W ranks of the process
group: rank r holds rows ``[class_start, class_start + num_local)`` of the full (C, D)
weight, the first ``C % W`` ranks one row more (:func:`shard_bounds`, the split of
insightface's Partial FC). The backbone is data parallel (DDP); the head is not: its
weight is a different tensor on every rank and must stay out of DDP.

One step (every rank, W ranks, B_local rows each, B = W·B_local)::

    x  = all_gather(local_embeddings)        (B, D)   autograd-aware (_GatherRows)
    y  = all_gather(local_labels)            (B,)     int64
    loss = margin_softmax(x, W_r, y, LossOptions(..., offset=class_start, group=group))
         # inside: all-reduce SUM of the target cosines, MAX then SUM of the row
         # statistics (3 all-reduces of B numbers); each rank's backward yields its
         # block's part of dL/dx and the full dL/dW_r
    backward of the gather: reduce-scatter SUM of dL/dx, this rank's rows, × W

The loss is the global-batch loss, the same number on every rank. The factor W in the
gather's backward undoes DDP's averaging of the backbone gradients: every rank holds
the true dL/dx_local of the global loss, so the backbone gradient summed over ranks is
the single-process one, and DDP divides the sum by W (``embedding_grad_scale``).

Sampling (``sample_rate < 1``, Partial FC)
------------------------------------------
Per step and rank: every class of the rank's block that is a label of the global
batch (a "positive") is kept, and negatives are drawn uniformly without replacement
to fill ``k = max(int(sample_rate·num_local), n_pos)`` rows (k >= 1; see below). The
draw: one uniform key per local class from the module's generator
(``torch.rand(num_local)``), positives' keys set to 2, the top k keys kept and sorted
ascending (so the sampled rows keep the class order). The generator lives on the
weight's device and is seeded with ``splitmix(seed, rank)``; ``seed=None`` draws the
seed from torch's default generator at construction (so ``torch.manual_seed`` makes
runs repeatable). The sampled rows enter the loss by ``index_select``: only they get
gradient, scattered back into the (num_local, D) ``weight.grad`` by autograd.

Labels are remapped per rank: a row whose class is in this rank's block gets the
index of that class among the sampled rows; other rows get k (outside the block). The
Function needs no global sampled index space (it only asks "is the target in my
block, and where"), so no offsets are exchanged.

Host synchronisation
--------------------
No step reads a device value on the host, with two documented exceptions:

* label validation (``validate=True``, the default) reads one bool, as the
  single-device API does (api.check_labels); ``validate=False`` removes it;
* sampling whose row count depends on the batch: when
  ``int(sample_rate·num_local) >= min(num_local, B)`` (the usual Partial FC regime,
  e.g. rate 0.1 of 125k local classes vs B = 1024) k is that constant and nothing is
  read; otherwise (``sample_rate=0``: in-batch classes only, or tiny rates) k depends
  on the number of positives, and this rank reads that one count. The kernels take
  dense blocks, so an exact in-batch softmax with a fixed-size buffer would need a
  ``num_valid`` argument in the backend contract; until then this is the one sync.
  A rank whose block holds no positive then samples no row at all (k = 0): the
  autograd.Function gives an empty block the neutral partials (max −inf, sum-exp 0).

Local batches must have the same size on every rank (``drop_last=True``): sizes are
not exchanged, which would cost a sync.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import backends
from .api import FLOAT_DTYPES, LABEL_DTYPES, validate_inputs
from .function import LossOptions, autocast_operand_dtype, margin_softmax
from .margins import is_finite_number
from .modules import INIT_STD, check_head_arguments

INIT_CHUNK_ROWS = 4096
"""Rows per independently seeded chunk of the weight initialisation (see
:func:`init_weight_rows`). Part of the definition of the initial weight for a seed:
changing it changes every initial weight."""

_MASK64 = (1 << 64) - 1


def _splitmix(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 finaliser chained over ``values``).

    Used so that (seed, rank) and (seed, chunk) give unrelated streams; plain
    ``seed + rank`` would make (seed=1, rank=0) and (seed=0, rank=1) identical.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


# ---------------------------------------------------------------------------------------
# Sharding and checkpoint helpers (no process group needed)
# ---------------------------------------------------------------------------------------


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``'s contiguous block of classes.

    The first ``num_classes % world_size`` ranks hold one class more than the others.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if not isinstance(num_classes, int) or num_classes < world_size:
        raise ValueError(f"num_classes must be an int >= world_size={world_size} "
                         f"(every rank needs at least one class), got {num_classes!r}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def init_weight_rows(start: int, num_rows: int, embedding_size: int, seed: int, *,
                     device=None, dtype=None) -> Tensor:
    """Rows ``[start, start + num_rows)`` of the initial (C, D) weight for ``seed``.

    The full weight is N(0, INIT_STD²) (as modules.py), drawn in chunks of
    INIT_CHUNK_ROWS rows, chunk q from a CPU float32 generator seeded with
    ``splitmix(seed, q)``. Any block of rows can therefore be produced without drawing
    the others, and the concatenation of the shards of any world size equals
    ``init_weight_rows(0, C, D, seed)`` — one process's initial weight.

    Returns:
        (num_rows, embedding_size) tensor of ``dtype`` (default float32) on ``device``.
    """
    out = torch.empty(num_rows, embedding_size, device=device, dtype=dtype or torch.float32)
    end = start + num_rows
    q = start // INIT_CHUNK_ROWS
    while q * INIT_CHUNK_ROWS < end:
        c0 = q * INIT_CHUNK_ROWS
        g = torch.Generator().manual_seed(_splitmix(seed, q))
        chunk = torch.randn(INIT_CHUNK_ROWS, embedding_size, generator=g).mul_(INIT_STD)
        lo, hi = max(start, c0), min(end, c0 + INIT_CHUNK_ROWS)
        out[lo - start:hi - start].copy_(chunk[lo - c0:hi - c0])
        q += 1
    return out


def shard_weight(full_weight: Tensor, world_size: int, rank: int) -> Tensor:
    """``rank``'s block (a contiguous clone) of a full (C, D) weight, for ``world_size`` ranks."""
    if not isinstance(full_weight, Tensor) or full_weight.dim() != 2:
        raise ValueError("full_weight must be a 2-D (C, D) tensor, got "
                         f"{getattr(full_weight, 'shape', type(full_weight).__name__)}")
    start, n = shard_bounds(full_weight.shape[0], world_size, rank)
    return full_weight[start:start + n].detach().clone()


def reshard(shards: Sequence[Tensor], world_size: int) -> list[Tensor]:
    """Offline re-sharding: the shards of one world size -> those of ``world_size``.

    Args:
        shards: the (num_local_r, D) weights of ranks 0..W-1, in rank order.
    Returns:
        ``world_size`` tensors, rank order, whose concatenation equals that of ``shards``.
    Raises:
        ValueError: when the shards' row counts are not :func:`shard_bounds`' for W ranks
        (shards out of rank order, where the split is uneven, or not one checkpoint's).
    """
    if len(shards) == 0:
        raise ValueError("shards must hold at least one (num_local, D) tensor")
    if any(not isinstance(t, Tensor) or t.dim() != 2 for t in shards):
        raise ValueError("shards must be 2-D (num_local, D) tensors, got shapes "
                         f"{[tuple(getattr(t, 'shape', ())) for t in shards]}")
    # The rows of shards in the wrong order would concatenate into a permuted weight;
    # with an uneven split their sizes show it (C=11 over 2 ranks: 6 then 5 rows).
    got = [t.shape[0] for t in shards]
    c = sum(got)
    want = [shard_bounds(c, len(shards), r)[1] for r in range(len(shards))]
    if got != want:
        raise ValueError(f"shards must be the blocks of ranks 0..{len(shards) - 1} in rank order "
                         f"(shard_bounds: {want} rows for C={c}), got {got} rows")
    full = torch.cat([s.detach() for s in shards], 0)
    return [shard_weight(full, world_size, r) for r in range(world_size)]


# ---------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------

# torch 2.14 renamed the tensor forms (the old names warn); keep both working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _await_collective_release(tensors: Sequence[Tensor], timeout_s: float = 1.0) -> bool:
    """Wait until Python's references are the only ones left to a finished collective's tensors.

    A gloo worker thread lets go of a collective's tensors only after the collective has
    returned. If Python has dropped a tensor by then, the worker must take the GIL to
    free its Python object, and once the interpreter is shutting down that kills the
    thread inside C++: the process aborts with "terminate called without an active
    exception" (gdb on the core: ~AsyncGatherWork -> TensorImpl::decref_pyobject ->
    take_gil under Py_FinalizeEx; a barrier only moves it, its work keeps the gather's
    alive). examples/train_sharded.py, which ends with gather_weight, did so in 7 of 100
    runs with torch 2.11 and 4 of 100 with 2.14 (2 CPU ranks, ``--steps 3``). DDP keeps
    the process group, and so its worker threads, alive until exit, so
    ``destroy_process_group`` does not avoid it. Waiting here, while the caller still
    holds the tensors, makes the worker's release a plain count decrement: 0 aborts in
    150 runs on each of the two torch versions since.

    Call it only on the checkpoint path (it polls, sleeping 0.1 ms a poll, with the GIL
    released; measured 0.04-0.4 ms on 2 CPU ranks). CPU tensors only: a CUDA
    collective's work holds its tensors until the GPU has run it, so waiting there would
    be a host sync (and that path has not shown the abort). Returns False for CUDA
    tensors, if ``timeout_s`` passed first (then only that exit race is left open), or
    if torch lacks ``Tensor._use_count`` (private; present in 2.11-2.14).
    """
    if not all(t.device.type == "cpu" and hasattr(t, "_use_count") for t in tensors):
        return False
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors):
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-4)
    return True


def _gather_rows_nograd(t: Tensor, group, world: int) -> Tensor:
    """(W·n, ...) concatenation in rank order of every rank's (n, ...) ``t``."""
    t = t.contiguous()
    out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
    _all_gather_single(out, t, group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather of the rows of (B_local, D) embeddings into (W·B_local, D), rank order.

    Backward: every rank's loss is the same global loss, but its backward only holds its
    class block's part of dL/dx; the parts are summed over ranks and each rank keeps its
    rows: one reduce-scatter (SUM). The result is multiplied by ``grad_scale`` (W under
    DDP, whose gradient averaging divides by W).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, world: int, grad_scale: float) -> Tensor:
        ctx.group, ctx.world, ctx.grad_scale = group, world, grad_scale
        return _gather_rows_nograd(x, group, world)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        out = g.new_empty((g.shape[0] // ctx.world,) + tuple(g.shape[1:]))
        _reduce_scatter_single(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.grad_scale != 1.0:
            out.mul_(ctx.grad_scale)
        return out, None, None, None


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------


def _resolve_group(group):
    """(process group or None, rank, world size). None when there is nothing to talk to."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialised; pass "
                         "group=None for a single process")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return (group if world > 1 else None), rank, world


class ShardedMarginSoftmaxLoss(nn.Module):
    """Margin-softmax head whose class centres are split over the ranks of ``group``.

    Owns ``weight`` of shape (num_local, embedding_size): rows
    ``[class_start, class_start + num_local)`` of the full (num_classes, D) weight
    (:func:`shard_bounds`). Initialised N(0, 0.01²) from :func:`init_weight_rows`, so
    the shards of any world size concatenate to the same full weight for a ``seed``.

    ``forward(local_embeddings (B_local, D), local_labels (B_local,)) -> loss`` over the
    global batch (W·B_local rows, rank order), the same value on every rank: a scalar,
    or (W·B_local,) for ``reduction="none"`` (reduce it the same way on every rank).

    Args:
        num_classes: C, the global number of classes (>= world size).
        embedding_size: D.
        margin, s, m, margin_grad, reduction, ignore_index, backend: as
            :func:`expface_kernels.margin_softmax_loss`. Labels are global, in
            [0, num_classes) or ``ignore_index``.
        sample_rate: 1.0 = model parallel (every class); in [0, 1): Partial FC sampling
            of int(sample_rate·num_local) rows per rank, positives always kept (module
            docstring); 0 = in-batch classes only.
        group: the process group; None = the default group when torch.distributed is
            initialised, else a single process (no collectives).
        seed: seeds the weight initialisation and the sampling stream (module docstring);
            None draws it from torch's default generator.
        embedding_grad_scale: factor on the embedding gradient routed back to each rank;
            None = world size, right when the backbone is in DDP (which averages). Use 1.0
            if backbone gradients are summed over ranks instead.
        validate: check labels (one host read of a bool per step); False skips it.
        device, dtype: of ``weight``.

    Attributes: ``rank``, ``world_size``, ``class_start``, ``num_local``,
    ``num_sample`` (int(sample_rate·num_local)), ``sampled_index`` (the local rows
    sampled in the last forward, (k,) int64 ascending; None without sampling).

    Keep this module out of DistributedDataParallel (its weight differs per rank); give
    its parameters to the optimiser directly. With sampling, rows that were not sampled
    get a zero gradient, not None: optimisers with weight decay or momentum still move
    them (as insightface's PartialFC_V2).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: str = "expface", *,
                 s: float = 64.0, m=None, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -1, sample_rate: float = 1.0, group=None,
                 backend: str = "auto", seed: Optional[int] = None,
                 embedding_grad_scale: Optional[float] = None, validate: bool = True,
                 device=None, dtype=None):
        super().__init__()
        spec, self.m = check_head_arguments(num_classes, embedding_size, margin, m, s, margin_grad,
                                            reduction, ignore_index, backend, dtype)
        self._margin_name = spec.name  # a str: the module stays picklable
        if not (isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
                and 0.0 <= sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be a number in [0, 1], got {sample_rate!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if embedding_grad_scale is not None and not is_finite_number(embedding_grad_scale):
            raise ValueError("embedding_grad_scale must be a finite number or None, "
                             f"got {embedding_grad_scale!r}")

        self.group, self.rank, self.world_size = _resolve_group(group)
        self.class_start, self.num_local = shard_bounds(num_classes, self.world_size, self.rank)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.s, self.margin_grad = margin, float(s), margin_grad
        self.reduction, self.ignore_index, self.backend = reduction, int(ignore_index), backend
        self.sample_rate = float(sample_rate)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.embedding_grad_scale = float(self.world_size if embedding_grad_scale is None
                                          else embedding_grad_scale)
        self.validate = bool(validate)
        if seed is None:
            # Same default generator state on every rank -> same seed -> the shards still
            # form one world-size-independent weight; sampling streams differ by rank.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.seed = seed
        self.sampled_index: Optional[Tensor] = None
        self._generator: Optional[torch.Generator] = None
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    # -- parameters and checkpoints -------------------------------------------------

    def reset_parameters(self) -> None:
        """Re-draw this rank's rows of the seed's initial full weight (init_weight_rows)."""
        with torch.no_grad():
            self.weight.copy_(init_weight_rows(self.class_start, self.num_local, self.embedding_size,
                                               self.seed, device=self.weight.device,
                                               dtype=self.weight.dtype))

    @torch.no_grad()
    def gather_weight(self, dst: Optional[int] = 0) -> Optional[Tensor]:
        """The full (num_classes, D) weight, for a checkpoint. Collective: call on every rank.

        Args:
            dst: group rank that receives it (others get None), or None for every rank.
        Shards are padded to ceil(C/W) rows so that one fixed-size collective suffices.
        Memory: the full weight on the receiving rank(s).
        """
        if self.group is None:
            return self.weight.detach().clone()
        if dst is not None and not (isinstance(dst, int) and 0 <= dst < self.world_size):
            raise ValueError(f"dst must be None or a rank in [0, {self.world_size}), got {dst!r}")
        rows = -(-self.num_classes // self.world_size)
        buf = self.weight.new_zeros(rows, self.embedding_size)
        buf[:self.num_local] = self.weight
        # Often the last collective before the process exits: hold its tensors until gloo
        # has let go of them (_await_collective_release).
        if dst is None:
            out = _gather_rows_nograd(buf, self.group, self.world_size)
            _await_collective_release((buf, out))
        else:
            lst = ([torch.empty_like(buf) for _ in range(self.world_size)]
                   if self.rank == dst else None)
            dist.gather(buf, lst, dst=dist.get_global_rank(self.group, dst), group=self.group)
            _await_collective_release([buf] + (lst or []))
            if self.rank != dst:
                return None
            out = torch.cat(lst, 0)
        parts = []
        for r in range(self.world_size):
            _, n = shard_bounds(self.num_classes, self.world_size, r)
            parts.append(out[r * rows:r * rows + n])
        return torch.cat(parts, 0)

    @torch.no_grad()
    def load_full_weight(self, full_weight: Tensor) -> None:
        """Copy this rank's block out of a full (num_classes, D) weight (any former world size)."""
        shape = (self.num_classes, self.embedding_size)
        if not isinstance(full_weight, Tensor) or tuple(full_weight.shape) != shape:
            raise ValueError(f"full_weight must have shape (num_classes, D)=({self.num_classes}, "
                             f"{self.embedding_size}), got {tuple(getattr(full_weight, 'shape', ()))}")
        self.weight.copy_(full_weight[self.class_start:self.class_start + self.num_local])

    # -- sampling -------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """The sampling generator, on the weight's device (re-created, re-seeded, if it moved)."""
        dev = self.weight.device
        if self._generator is None or self._generator.device != dev:
            self._generator = torch.Generator(device=dev).manual_seed(_splitmix(self.seed, 0x5A3D, self.rank))
        return self._generator

    def _sample(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Partial FC draw for one step.

        Args:
            labels: (B,) int64 global labels, ignored rows −1.
        Returns:
            index (k,) int64 ascending local rows, and (B,) int64 labels in the sampled
            block's index space: the sampled position for rows of this block, k for rows
            of other blocks, −1 for ignored rows.
        """
        n_loc, dev = self.num_local, labels.device
        local = labels - self.class_start
        mine = (local >= 0) & (local < n_loc)  # ignored rows are -1 - class_start < 0
        col = local.clamp(0, n_loc - 1)
        # Positive mask via counts (index_add is deterministic; index_put of bools with
        # repeated indices is not).
        hits = torch.zeros(n_loc, dtype=torch.int32, device=dev).index_add_(0, col, mine.to(torch.int32))
        positive = hits > 0
        if self.num_sample >= min(n_loc, labels.shape[0]):
            k = self.num_sample  # n_pos can never exceed it: no host read
        else:
            # Data-dependent count (module docstring, "Host synchronisation").
            k = max(self.num_sample, int(positive.sum()))
        keys = torch.rand(n_loc, generator=self.generator, device=dev)
        keys = torch.where(positive, torch.full_like(keys, 2.0), keys)
        index = torch.topk(keys, k, sorted=False).indices.sort().values
        remap = torch.full((n_loc,), k, dtype=torch.long, device=dev)
        remap[index] = torch.arange(k, device=dev)
        new = torch.where(mine, remap[col], torch.full_like(labels, k))
        new = torch.where(labels < 0, torch.full_like(labels, -1), new)
        return index, new

    # -- forward --------------------------------------------------------------------

    def _check_local(self, x, y) -> None:
        # Host-side metadata checks before any collective, so that a wrong shape fails
        # here instead of inside a mismatched all-gather. Label values are checked after
        # the gather, identically on every rank.
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError("local_embeddings must be a float16/bfloat16/float32/float64 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.embedding_size or x.shape[0] == 0:
            raise ValueError(f"local_embeddings must have shape (B_local >= 1, {self.embedding_size}), "
                             f"got {tuple(x.shape)}")
        if not isinstance(y, Tensor) or y.dtype not in LABEL_DTYPES:
            raise TypeError("local_labels must be an int32/int64 tensor, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"local_labels must have shape (B_local,)=({x.shape[0]},), got {tuple(y.shape)}")
        if x.device != self.weight.device or y.device != self.weight.device:
            raise ValueError(f"local_embeddings ({x.device}) and local_labels ({y.device}) must be on "
                             f"the weight's device ({self.weight.device})")

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """Loss over the global batch (see the class docstring); float32 (float64 for float64 inputs)."""
        self._check_local(local_embeddings, local_labels)
        x = local_embeddings.contiguous()
        labels = local_labels.long()
        if self.group is not None:
            x = _GatherRows.apply(x, self.group, self.world_size, self.embedding_grad_scale)
            labels = _gather_rows_nograd(labels, self.group, self.world_size)
        elif self.embedding_grad_scale != 1.0:
            x = _ScaleGrad.apply(x, self.embedding_grad_scale)
        if self.validate:
            validate_inputs(x, self.weight, labels, self.s, self.margin_grad, self.reduction,
                            self.ignore_index, num_classes=self.num_classes)
        labels = torch.where(labels == self.ignore_index, torch.full_like(labels, -1), labels)
        if self.sample_rate < 1.0:
            index, labels = self._sample(labels)
            self.sampled_index = index
            w, offset = self.weight.index_select(0, index), 0
        else:
            w, offset = self.weight, self.class_start
        operand_dtype = autocast_operand_dtype(x, w)
        be = backends.select_backend(self.backend, x, w, x_dtype=operand_dtype)
        opts = LossOptions(be, self._margin_name, self.m, self.s, self.margin_grad, self.reduction, -1,
                           offset, self.group, operand_dtype)
        return margin_softmax(x, w.contiguous(), labels, opts)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"rank={self.rank}, world_size={self.world_size}, class_start={self.class_start}, "
                f"num_local={self.num_local}, margin={self.margin!r}, s={self.s}, m={self.m}, "
                f"margin_grad={self.margin_grad!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, sample_rate={self.sample_rate}, "
                f"backend={self.backend!r}")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient × ``scale`` (a single process given an explicit scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.scale, None
