"""Reduction of calibration statistics across data-parallel ranks (torch.distributed).

``reduce_statistics(model)`` runs after ``forward_loop`` and before amax is
computed from the calibrators. With no initialised process group (or a group of
one rank) it does nothing. Otherwise every rank must call it (qpass does, from
``quantize``/``calibrate``), with the same model and config, each having run
``forward_loop`` on its own share of the calibration data; afterwards every
rank holds the statistics of the union of the data, so every rank computes the
same amax.

Contract for a new kind of statistic
------------------------------------
Statistics are found by *sources* and reduced by *reducers*:

- A source (``register_source``) is a function ``model -> iterable of
  StatItem(name, obj, device)``. The built-in source yields the calibrator of
  every ``TensorQuantizer`` (named after the quantizer). Names must be unique
  and identical on every rank; ``device`` is where a rank that has no data of
  its own should put the reduced tensors (the owning module's device).
- A reducer (``register_reducer(kind)``) is a function
  ``reduce(items: list[StatItem], comm: Comm) -> None`` for every object whose
  type is ``kind`` or a subclass of it (the most specific registered kind wins).
  It is called once per kind, with that kind's items sorted by name, on every
  rank, and updates the objects in place. It must issue the same collectives in
  the same order on every rank, whatever the local data: so it talks to the
  group only through ``comm``, whose methods are collective:

  - ``comm.all_reduce(tensors, op)``: tensors every rank has (counts, ...).
  - ``comm.all_reduce_optional(tensors, op, devices)``: tensors a rank may lack
    (``None``: an MoE expert that got no tokens there). Ranks first agree on who
    has data and on dtype/shape; a rank without data takes part with the op's
    neutral value (0 for SUM, the dtype's lowest for MAX, ...) and receives the
    result; an entry no rank has stays ``None`` everywhere.

  Both batch all tensors of one call into one collective per dtype, and run on
  the group's device (CPU for gloo, the current CUDA device for NCCL); results
  come back on each tensor's own device.

Reductions by kind: max calibration keeps a running abs-max (MAX) and a batch
count (SUM). Histogram calibrators should first agree on a common range
(``all_reduce_optional`` of the range with MAX), re-bin their local counts onto
it, then SUM the counts. Per-channel abs-max statistics (AWQ, SmoothQuant)
reduce with MAX, sums and token counts with SUM, means as (sum, count) pairs. Static affine
biases (``qpass.calib.bias``, one item per quantizer named ``<quantizer>._bias``): extremes with
MAX/MIN, means as (sum, count), the ``histogram`` method's signed histograms re-binned onto one
grid and summed.

Which group: the whole world unless ``set_data_parallel_group(group)`` names the
data-parallel group (e.g. with tensor or pipeline parallelism, the ranks that
hold the same shard).

A rank that raises before the reduction (a NaN in its data, say) leaves the
others waiting in the first collective until the process group's timeout.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from qpass.calib.max import MaxCalibrator
from qpass.errors import CalibrationError

__all__ = [
    "Comm",
    "StatItem",
    "reduce_statistics",
    "register_reducer",
    "register_source",
    "set_data_parallel_group",
]


@dataclass
class StatItem:
    """One statistic holder: a unique name, the object a reducer updates, a device hint."""

    name: str
    obj: Any
    device: torch.device


Reducer = Callable[[list, "Comm"], None]
Source = Callable[[nn.Module], Iterable[StatItem]]

_REDUCERS: dict[type, Reducer] = {}
_SOURCES: list[Source] = []
_GROUP = None  # None: the default (world) group


def register_reducer(kind: type) -> Callable[[Reducer], Reducer]:
    """Decorator: ``fn(items, comm)`` reduces every statistic object of type ``kind``."""

    def deco(fn: Reducer) -> Reducer:
        _REDUCERS[kind] = fn
        return fn

    return deco


def register_source(fn: Source) -> Source:
    """Register a function ``model -> iterable of StatItem`` (usable as a decorator)."""
    if fn not in _SOURCES:
        _SOURCES.append(fn)
    return fn


def set_data_parallel_group(group) -> None:
    """The process group calibration statistics are reduced over (None: the world)."""
    global _GROUP
    _GROUP = group


def _reducer_for(obj) -> tuple[type, Reducer] | None:
    for cls in type(obj).__mro__:
        if cls in _REDUCERS:
            return cls, _REDUCERS[cls]
    return None


def _kind_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------- collectives
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
]
_MAX_NDIM = 8
_FIELDS = 3 + _MAX_NDIM  # has data, dtype code, ndim, dims
_ABSENT = -(2**62)
_UNSUPPORTED = 1000  # dtype code of a tensor that cannot be reduced (agreed on, then raised on every rank)


def _neutral(op, dtype: torch.dtype):
    import torch.distributed as dist

    if op == dist.ReduceOp.SUM:
        return 0
    if op == dist.ReduceOp.PRODUCT:
        return 1
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    if op == dist.ReduceOp.MAX:
        return -float("inf") if dtype.is_floating_point else info.min
    if op == dist.ReduceOp.MIN:
        return float("inf") if dtype.is_floating_point else info.max
    raise ValueError(f"no neutral element for reduce op {op}")


class Comm:
    """Collectives over one process group, on the device its backend works on."""

    # Largest number of elements sent in one collective (bounds the staging buffer).
    bucket_numel = 1 << 26

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:  # gloo, mpi, ucc, or a mixed "cpu:gloo,cuda:nccl" group: CPU tensors work
            self.device = torch.device("cpu")

    def _reduce_flat(self, tensors: list[torch.Tensor], op) -> list[torch.Tensor]:
        """All-reduce same-dtype tensors through flat buffers; results on self.device."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(tensors):
            stop, numel = start, 0
            while stop < len(tensors) and (stop == start or numel + tensors[stop].numel() <= self.bucket_numel):
                numel += tensors[stop].numel()
                stop += 1
            chunk = tensors[start:stop]
            flat = torch.cat([t.reshape(-1).to(self.device) for t in chunk])
            self.dist.all_reduce(flat, op=op, group=self.group)
            out.extend(p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in chunk]), chunk))
            start = stop
        return out

    def _reduce_by_dtype(self, tensors: list[torch.Tensor], op) -> list[torch.Tensor]:
        """One collective per dtype (same dtype order on every rank: the caller's tensors agree)."""
        result: list = [None] * len(tensors)
        for dtype in _DTYPES:
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            if idx:
                for i, r in zip(idx, self._reduce_flat([tensors[i] for i in idx], op)):
                    result[i] = r
        return result

    def all_reduce(self, tensors: Sequence[torch.Tensor], op) -> list[torch.Tensor]:
        """Reduce tensors that every rank has, with the same dtypes and shapes in the same order.

        Returns new tensors, each on its input's device.
        """
        tensors = list(tensors)
        for t in tensors:
            if t.dtype not in _DTYPES:
                raise TypeError(f"cannot reduce a {t.dtype} statistic")
        reduced = self._reduce_by_dtype(tensors, op)
        return [r.to(t.device) for r, t in zip(reduced, tensors)]

    def all_reduce_optional(
        self,
        tensors: Sequence[torch.Tensor | None],
        op,
        devices: Sequence[torch.device] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[torch.Tensor | None]:
        """Reduce tensors that some ranks may lack (None). Two or more collectives.

        A rank without an entry receives the reduced tensor on ``devices[i]`` (default: the
        group's device); an entry no rank has stays None on every rank. Ranks that have an
        entry must agree on its dtype and shape, or every rank raises CalibrationError.
        """
        tensors = list(tensors)
        n = len(tensors)
        if n == 0:
            return []
        names = list(names) if names is not None else [f"#{i}" for i in range(n)]
        meta = torch.zeros(n, _FIELDS, dtype=torch.int64)
        neg = torch.full((n, _FIELDS), _ABSENT, dtype=torch.int64)
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if t.dtype not in _DTYPES or t.dim() > _MAX_NDIM:
                # Not raised here: the ranks without this entry would wait in the collective.
                row = [1, _UNSUPPORTED] + [0] * (_FIELDS - 2)
            else:
                row = [1, _DTYPES.index(t.dtype), t.dim(), *t.shape] + [0] * (_MAX_NDIM - t.dim())
            meta[i] = torch.tensor(row, dtype=torch.int64)
            neg[i] = -meta[i]
        # One MAX gives the max over ranks with data (meta) and minus their min (neg).
        agreed = self._reduce_flat([torch.cat([meta, neg])], self.dist.ReduceOp.MAX)[0].cpu()
        hi, lo = agreed[:n], -agreed[n:]
        present = hi[:, 0] == 1
        unsupported = [names[i] for i in range(n) if present[i] and int(hi[i, 1]) == _UNSUPPORTED]
        if unsupported:
            raise CalibrationError(
                f"{len(unsupported)} calibration statistic(s) cannot be reduced (dtype outside "
                f"{[str(d) for d in _DTYPES]} or more than {_MAX_NDIM} dims): {', '.join(unsupported[:5])}"
            )
        bad = [names[i] for i in range(n) if present[i] and not torch.equal(hi[i, 1:], lo[i, 1:])]
        if bad:
            raise CalibrationError(
                f"{len(bad)} calibration statistic(s) differ in dtype or shape between ranks: "
                f"{', '.join(bad[:5])}; every rank must quantize the same model with the same config"
            )
        full: list[torch.Tensor] = []
        where: list[int] = []
        for i in range(n):
            if not present[i]:
                continue
            t = tensors[i]
            if t is None:
                dtype = _DTYPES[int(hi[i, 1])]
                shape = [int(s) for s in hi[i, 3 : 3 + int(hi[i, 2])]]
                t = torch.full(shape, _neutral(op, dtype), dtype=dtype, device=self.device)
            full.append(t)
            where.append(i)
        reduced = self._reduce_by_dtype(full, op)
        out: list[torch.Tensor | None] = [None] * n
        for i, r in zip(where, reduced):
            if tensors[i] is not None:
                home = tensors[i].device
            else:
                home = devices[i] if devices is not None else self.device
            out[i] = r.to(home)
        return out

    def check_same(self, text: str, what: str) -> None:
        """Every rank raises CalibrationError unless ``text`` is identical on all ranks."""
        h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        v = torch.tensor([h, -h], dtype=torch.int64)
        v = self._reduce_flat([v], self.dist.ReduceOp.MAX)[0].cpu()
        if int(v[0]) == -int(v[1]):
            return
        # Every rank saw the mismatch: gather the texts (collective) to name the first difference.
        texts: list = [None] * self.world_size
        self.dist.all_gather_object(texts, text, group=self.group)
        lines = [t.splitlines() for t in texts]
        diff = ""
        for r in range(1, self.world_size):
            a, b = set(lines[0]), set(lines[r])
            if a != b:
                only0, only_r = sorted(a - b), sorted(b - a)
                diff = (f"rank 0 only: {only0[:3]}{' ...' if len(only0) > 3 else ''}; "
                        f"rank {r} only: {only_r[:3]}{' ...' if len(only_r) > 3 else ''}")
                break
        raise CalibrationError(
            f"ranks disagree on {what} ({diff or 'same entries in another order'}); every rank of the "
            "data-parallel group must quantize the same model with the same config (and trace the "
            "same ops) before calibration statistics are reduced"
        )


# ---------------------------------------------------------------------- sources
def _home_device(model: nn.Module, name: str, fallback: torch.device) -> torch.device:
    path = name
    while True:
        path = path.rpartition(".")[0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            for t in module.parameters(recurse=False):
                return t.device
            for t in module.buffers(recurse=False):
                return t.device
        if not path:
            break
    for t in model.parameters():
        return t.device
    return fallback


@register_source
def _quantizer_calibrators(model: nn.Module) -> Iterable[StatItem]:
    from qpass.nn.tensor_quantizer import TensorQuantizer

    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.calibrator is not None:
            yield StatItem(name, q.calibrator, None)
        if isinstance(q, TensorQuantizer) and q._bias_calibrator is not None:  # static affine bias
            yield StatItem(f"{name}._bias", q._bias_calibrator, None)


# ---------------------------------------------------------------------- reducers
@register_reducer(MaxCalibrator)
def _reduce_max(items: list[StatItem], comm: Comm) -> None:
    cals = [it.obj for it in items]
    amax = comm.all_reduce_optional(
        [c._amax for c in cals], comm.dist.ReduceOp.MAX,
        devices=[it.device for it in items], names=[it.name for it in items],
    )
    counts = comm.all_reduce([torch.tensor([c.num_batches for c in cals], dtype=torch.int64)], comm.dist.ReduceOp.SUM)[0]
    for c, a, k in zip(cals, amax, counts.tolist()):
        c._amax = a
        c.num_batches = int(k)


# ---------------------------------------------------------------------- entry point
def reduce_statistics(model: nn.Module, group=None) -> None:
    """Reduce every calibration statistic of ``model`` across the data-parallel ranks.

    Collective: every rank of the group must call it. No-op without an initialised process
    group or with a group of one rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    group = group if group is not None else _GROUP
    if dist.get_world_size(group) == 1:
        return
    comm = Comm(group)
    items: list[StatItem] = []
    for source in _SOURCES:
        items.extend(source(model))
    items.sort(key=lambda it: it.name)
    by_kind: dict[type, tuple[Reducer, list[StatItem]]] = {}
    unknown = []
    for it in items:
        found = _reducer_for(it.obj)
        if found is None:
            unknown.append(f"{it.name} ({type(it.obj).__name__})")
            continue
        by_kind.setdefault(found[0], (found[1], []))[1].append(it)
        if it.device is None:
            it.device = _home_device(model, it.name, comm.device)
    # Agree on the full list (names and kinds) first, so every rank runs the same collectives.
    listing = "\n".join(f"{it.name}\t{_kind_name(type(it.obj))}" for it in items)
    comm.check_same(listing, "the calibration statistics to reduce (quantizer names or calibrator kinds)")
    # From here on every rank has the same listing, so every rank raises (or not) alike.
    counts = Counter(it.name for it in items)
    if len(counts) != len(items):
        dup = sorted(n for n, k in counts.items() if k > 1)
        raise CalibrationError(f"calibration statistics with duplicate names: {', '.join(dup[:5])}")
    if unknown:
        raise CalibrationError(
            f"no distributed reduction is registered for {len(unknown)} calibration statistic(s): "
            f"{', '.join(unknown[:5])}; register one with qpass.calib.distributed.register_reducer"
        )
    for kind in sorted(by_kind, key=_kind_name):
        reducer, kind_items = by_kind[kind]
        reducer(kind_items, comm)
