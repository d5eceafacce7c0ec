"""Activation captures reduced across data-parallel ranks, so every rank searches the same data.

Without this, each rank's AWQ/SmoothQuant/GPTQ/local-Hessian search would run on its own share
of the calibration data: the max-calibrated amaxes agree (:mod:`qpass.calib.distributed`), but the
smoothing scales, clip ratios and GPTQ roundings would not, and the ranks would end with
different models. After a capture pass (``ActivationCapture.__exit__``) every rank instead holds:

- per-channel abs-max: the MAX over ranks; abs-sums, token and call counts, Gram/Hessian sums:
  the SUM (the statistics of the union of the data);
- the token subsample: every rank's kept tokens, gathered, then the ``limit`` smallest keys of
  the union (each rank draws its own keys, so this is a uniform subsample of the union).

Statistics are exchanged once per distinct object (q/k/v share one), named by the first module
path that holds it; a rank that saw no data for a module takes part with a neutral value and
receives the result. Collective: every rank must run the same capture passes. No-op without an
initialised process group or with one rank.
"""

from __future__ import annotations

import torch

__all__ = ["reduce_across_ranks"]


def _comm():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from qpass.calib import distributed

    group = distributed._GROUP
    if dist.get_world_size(group) == 1:
        return None
    return distributed.Comm(group)


def reduce_across_ranks(capture) -> dict:
    """``capture.stats`` with every statistic reduced over the data-parallel ranks."""
    comm = _comm()
    if comm is None:
        return capture.stats
    paths = list(capture.modules)
    stats = capture.stats
    first: dict[int, str] = {}
    for p in paths:
        st = stats.get(p)
        if st is not None:
            first.setdefault(id(st), p)
    heads = [stats[p] if stats.get(p) is not None and first[id(stats[p])] == p else None for p in paths]
    devices = [capture._home(p, torch.empty(0)) for p in paths]
    reduced = capture.reduce_heads(heads, paths, devices, comm)
    out, by_id = {}, {}
    for p, new in zip(paths, reduced):
        old = stats.get(p)
        if new is not None:
            out[p] = new
            if old is not None:
                by_id[id(old)] = new
    for p in paths:  # modules that shared an object here share the reduced one
        old = stats.get(p)
        if p not in out and old is not None and id(old) in by_id:
            out[p] = by_id[id(old)]
    return out


def sum_counts(heads, comm) -> list:
    """(tokens, calls) per head, summed over ranks (None where no rank has data)."""
    counts = [None if h is None else torch.tensor([h.tokens, h.calls], dtype=torch.int64) for h in heads]
    return comm.all_reduce_optional(counts, comm.dist.ReduceOp.SUM, devices=[torch.device("cpu")] * len(heads))


def gather_rows(tensors: list, limit: int, comm, devices) -> list:
    """Each rank's ``[n <= limit, ...]`` rows, concatenated in rank order on every rank."""
    world, rank = comm.world_size, comm.rank
    counts, padded = [], []
    for t in tensors:
        if t is None:
            counts.append(None)
            padded.append(None)
            continue
        n = torch.zeros(world, dtype=torch.int64)
        n[rank] = t.shape[0]
        buf = t.new_zeros((world, limit, *t.shape[1:]))
        buf[rank, : t.shape[0]] = t
        counts.append(n)
        padded.append(buf)
    counts = comm.all_reduce_optional(counts, comm.dist.ReduceOp.SUM, devices=[torch.device("cpu")] * len(tensors))
    padded = comm.all_reduce_optional(padded, comm.dist.ReduceOp.SUM, devices=devices)
    out = []
    for n, buf in zip(counts, padded):
        out.append(None if n is None else torch.cat([buf[r, : int(n[r])] for r in range(world)]))
    return out


def reduce_sums(heads, paths, devices, comm) -> list:
    """(sum of ``xtx``, tokens, calls) per head over the ranks; (None, 0, 0) where no rank has data."""
    xtx = comm.all_reduce_optional([None if h is None else h.xtx for h in heads], comm.dist.ReduceOp.SUM,
                                   devices, paths)
    counts = sum_counts(heads, comm)
    return [(x, 0, 0) if x is None else (x, int(n[0]), int(n[1])) for x, n in zip(xtx, counts)]
