"""Activation capture: what each weighted module's input quantizer sees, in one forward_loop pass.

Per captured module it keeps the per-input-channel abs-max and abs-sum (SmoothQuant and
AWQ statistics, over every token) and a bounded, seeded, uniform token subsample of the
inputs (for per-layer searches run later, offline, without calling forward_loop again).

Mechanism: a forward pre-hook on the input quantizer modules (the ``call_module`` nodes
the insertion pass placed before each weighted op). Hooks are torch's own observation
mechanism: they fire for every traced graph (each input structure gets its own graph, all
sharing the quantizer modules), also for graphs traced during the pass itself, need no
change to ``TensorQuantizer`` or to ``run_graph``, cost nothing once removed, and leave the
quantizer's own calibration mode (max statistics in the same pass) untouched. An
``fx.Interpreter`` would instead have to replace ``run_graph``'s compiled call for the
duration of the pass, and would run every node through Python.

Shared inputs (q/k/v) cost one record: statistics are immutable values updated by a
memoised step keyed on (previous statistics object, input tensor object), so modules that
read the same tensor in the same order end up holding the very same objects; modules
whose inputs diverge simply get their own. The groups need not be known in advance (on a
first, lazy trace they are not).

The subsample is a bottom-k sample on random keys: every token gets a uniform key from a
seeded generator and the ``max_tokens`` smallest keys seen so far are kept, which is a
uniform sample without replacement over all tokens of the pass.

With ``grow_to`` above ``max_tokens`` the sample grows with the data: it is the
``clamp(tokens // GROW_EVERY, max_tokens, grow_to)`` smallest keys of the whole pass, a size
known only at its end. The pass keeps what that sample can need and no more: the
``max_tokens`` smallest keys so far, plus every key below ``GROW_KEY`` (a little above
``1 / GROW_EVERY``), up to the ``grow_to`` smallest of those. On little data (``tokens <=
GROW_EVERY * max_tokens``) the sample is exactly the fixed-size one and costs about the same;
on more data the ``tokens // GROW_EVERY`` smallest keys all lie below ``GROW_KEY`` (the gap is
six standard deviations of that order statistic at the smallest size where it matters, and
grows with the data), so the sample is again exact. Each module path has its
own generator (seeded from the seed and the path), so the keys a module draws depend only
on its own sequence of calls, not on how calls of different modules interleave: a
layer-by-layer pass (:mod:`qpass.calib.layerwise`), which runs block 0 over every batch
before block 1, draws exactly the keys a whole-model pass draws.

Statistics are kept on the device of the module's weight (its home), computed on the
input's device: when layerwise calibration runs a CPU-resident block on the GPU, the
captured sample stays next to the weights the offline searches multiply it with.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from qpass.calib.max import channel_abs_max, channel_abs_top2
from qpass.errors import CalibrationError

_MEMO_SIZE = 64
#: a growing sample (``grow_to``) keeps one token in this many
GROW_EVERY = 8
#: keys below this may enter a growing sample (1.25 / GROW_EVERY: see the module docstring)
GROW_KEY = 1.25 / GROW_EVERY


@dataclass(frozen=True)
class InputStats:
    """Statistics of one module's input over the pass (never mutated: updates make new ones).

    The subsample is held as chunks of (keys, rows) in arrival order, each chunk's rows a copy of
    only the tokens that could still enter; :attr:`sample` keeps the :attr:`sample_size` smallest
    keys of all of them, in arrival order (built once, on first use)."""

    amax: torch.Tensor  # [C] float32: per-channel abs-max over all tokens
    abs_sum: torch.Tensor | None  # [C] float64: per-channel sum of |x| over all tokens (None: not kept)
    tokens: int  # tokens seen
    calls: int  # forward calls seen
    chunks: tuple  # ((keys [n], rows [n, C] float32), ...): candidate tokens, arrival order
    limit: int  # the subsample's size bound (max_tokens)
    grow_to: int = 0  # above ``limit``: the sample grows with the data up to this many tokens
    below: int = 0  # candidates with a key below GROW_KEY (counted only when the sample grows)
    # [C] float32: per-channel second largest |x| over all tokens, a lower bound (see
    # :func:`qpass.calib.max.channel_abs_top2`); None: not kept
    second: torch.Tensor | None = None

    @property
    def sample_size(self) -> int:
        """How many tokens the sample holds once the pass is over (fewer if fewer were seen)."""
        if self.grow_to <= self.limit:
            return self.limit
        return min(self.grow_to, max(self.limit, self.tokens // GROW_EVERY))

    @functools.cached_property
    def _kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _bottom_k(self.chunks, self.sample_size)

    @property
    def sample(self) -> torch.Tensor:
        """[<= sample_size, C] float32: a uniform subsample of the tokens, in arrival order."""
        return self._kept[1]

    @property
    def keys(self) -> torch.Tensor:
        """[<= sample_size] the subsample's random keys."""
        return self._kept[0]

    def moved(self, to) -> "InputStats":
        """The same statistics with every tensor passed through ``to`` (a device move)."""
        keys, rows = self._kept
        return InputStats(amax=to(self.amax), abs_sum=None if self.abs_sum is None else to(self.abs_sum),
                          tokens=self.tokens, calls=self.calls, chunks=((to(keys), to(rows)),), limit=self.limit,
                          grow_to=self.grow_to, below=_below(keys, self.grow_to),
                          second=None if self.second is None else to(self.second))

    @property
    def candidates(self) -> int:
        return sum(k.numel() for k, _ in self.chunks)

    def threshold(self) -> torch.Tensor | float | None:
        """Only tokens with a key below this can still enter the sample (None: any token can)."""
        if self.limit <= 0 or self.candidates < self.limit:
            return None
        if self.grow_to > self.limit and self.limit < self.below <= self.grow_to:
            return GROW_KEY  # every key below it may be needed, and only those
        keys = torch.cat([k for k, _ in self.chunks])
        # below <= limit: the fixed-size cut is the wider one; below > grow_to: the grow_to smallest
        return torch.kthvalue(keys, self.capacity()).values

    def capacity(self) -> int:
        """How many of the smallest candidate keys can still be needed (compaction keeps them)."""
        if self.grow_to <= self.limit:
            return self.limit
        return max(self.limit, min(self.grow_to, self.below))

    def compacted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate the final sample can still need: (keys, rows), arrival order."""
        return _bottom_k(self.chunks, self.capacity())

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise RuntimeError("this capture kept no per-channel sums (ActivationCapture(sums=False))")
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def channels(self) -> int:
        return self.amax.numel()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def key_seed(seed: int, path: str, rank: int = 0) -> int:
    """The seed of module ``path``'s key generator. A CPU generator keeps only the low 32 bits of
    its seed, so ``seed`` is mixed into those (seed 0 leaves the path's CRC as it is); data-parallel
    ranks draw different keys (rank 0: the single-process ones)."""
    return (((seed * 0x9E3779B1) ^ zlib.crc32(path.encode())) + 1_000_003 * rank) & 0xFFFFFFFF


def _below(keys: torch.Tensor, grow_to: int) -> int:
    return int((keys < GROW_KEY).sum()) if grow_to else 0


def _bottom_k(chunks, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with the ``limit`` smallest keys over ``chunks``, in arrival order."""
    keys = torch.cat([k for k, _ in chunks])
    rows = torch.cat([r for _, r in chunks]) if len(chunks) > 1 else chunks[0][1]
    if keys.numel() > limit:
        # a stable sort, not topk: equal keys (float32 keys do repeat among thousands) are taken in
        # arrival order on every device, so a pass on the GPU and one storing its statistics on the
        # CPU (layerwise calibration of an offloaded model) keep the same tokens
        keep = torch.sort(keys, stable=True).indices[:limit].sort().values
        keys, rows = keys[keep], rows[keep]
    return keys, rows


class ActivationCapture:
    """Context manager recording :class:`InputStats` for the input quantizers of ``modules``.

    ``modules`` maps a module path to the module; its ``input_quantizer`` submodule is
    observed. The tensor recorded is the one the quantizer quantizes, i.e. after an
    existing ``pre_quant_scale``. ``max_tokens=0`` keeps only the per-channel statistics;
    ``sums=False`` leaves out the per-channel sums (``abs_mean``), which only AWQ reads;
    ``second=True`` also keeps each channel's second largest |x| (:attr:`InputStats.second`), which
    SmoothQuant's search reads.
    """

    def __init__(self, modules: dict[str, nn.Module], max_tokens: int = 4096, seed: int = 0,
                 sums: bool = True, grow_to: int = 0, second: bool = False) -> None:
        self.modules = modules
        self.second = bool(second)
        self.max_tokens = int(max_tokens)
        self.grow_to = int(grow_to) if int(grow_to) > self.max_tokens > 0 else 0
        self.sums = sums
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.stats: dict[str, InputStats] = {}
        self._handles: list = []
        self._memo: OrderedDict = OrderedDict()

    def __enter__(self) -> "ActivationCapture":
        for path, module in self.modules.items():
            q = module._modules.get("input_quantizer")
            if q is None:
                continue
            self._handles.append(q.register_forward_pre_hook(self._hook(path, q)))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._memo.clear()
        if exc_type is None:
            from qpass.calib.capture_reduce import reduce_across_ranks

            self.stats = reduce_across_ranks(self)

    def reduce_heads(self, heads: list, paths: list[str], devices: list, comm) -> list:
        """:func:`qpass.calib.capture_reduce.reduce_across_ranks`'s step for :class:`InputStats`."""
        from qpass.calib.capture_reduce import gather_rows, sum_counts

        op = comm.dist.ReduceOp
        amax = comm.all_reduce_optional([None if h is None else h.amax for h in heads], op.MAX, devices, paths)
        sums = comm.all_reduce_optional([None if h is None else h.abs_sum for h in heads], op.SUM, devices, paths)
        counts = sum_counts(heads, comm)
        # a growing sample's size depends on the tokens of all ranks: every rank sends all it kept
        kept = [None if h is None or self.max_tokens <= 0 else h.compacted() if self.grow_to else h._kept
                for h in heads]
        seconds = [None] * len(heads)
        if self.second:  # the union's two largest of every rank's two largest
            tops = gather_rows([None if h is None else torch.stack([h.amax, h.second]) for h in heads], 2, comm,
                               devices)
            seconds = [None if t is None else t.topk(2, dim=0).values[1] for t in tops]
        bound = max(self.max_tokens, self.grow_to)
        keys = gather_rows([None if k is None else k[0] for k in kept], bound, comm, devices)
        rows = gather_rows([None if k is None else k[1] for k in kept], bound, comm, devices)
        out = []
        for a, total, n, k, r, sec in zip(amax, sums, counts, keys, rows, seconds):
            if a is None:
                out.append(None)
                continue
            if k is None:
                k, r = a.new_zeros(0), a.new_zeros(0, a.numel())
            out.append(InputStats(amax=a, abs_sum=total, tokens=int(n[0]), calls=int(n[1]), chunks=((k, r),),
                                  limit=self.max_tokens, grow_to=self.grow_to, below=_below(k, self.grow_to),
                                  second=sec))
        return out

    def _generator(self, path: str) -> torch.Generator:
        g = self._generators.get(path)
        if g is None:
            g = torch.Generator().manual_seed(key_seed(self.seed, path, _rank()))
            self._generators[path] = g
        return g

    def _home(self, path: str, like: torch.Tensor) -> torch.device:
        weight = getattr(self.modules[path], "weight", None)
        return weight.device if isinstance(weight, torch.Tensor) else like.device

    def _hook(self, path: str, quantizer: nn.Module):
        def hook(_module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.numel():
                self._record(path, quantizer, x)

        return hook

    def _record(self, path: str, quantizer: nn.Module, x: torch.Tensor) -> None:
        prev = self.stats.get(path)
        key = (id(prev), id(x))
        hit = self._memo.get(key)
        if hit is not None and hit[0]() is x and hit[1] is prev:
            self.stats[path] = hit[2]
            return
        new = self._update(path, prev, quantizer, x)
        self.stats[path] = new
        self._memo[key] = (weakref.ref(x), prev, new)
        while len(self._memo) > _MEMO_SIZE:
            self._memo.popitem(last=False)

    @staticmethod
    def _rows(path: str, prev, quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input as float32 tokens x channels, after the quantizer's pre_quant_scale; checked."""
        pqs = getattr(quantizer, "pre_quant_scale", None)
        x = x.detach()
        if pqs is not None:
            x = x * pqs.to(x.dtype)
        x = x.reshape(-1, x.shape[-1]).float()
        if prev is not None and prev.channels != x.shape[-1]:
            raise CalibrationError(
                f"the input of '{path}' changed from {prev.channels} to {x.shape[-1]} channels between calls"
            )
        return x

    @torch.no_grad()
    def _update(self, path: str, prev: InputStats | None, quantizer: nn.Module, x: torch.Tensor) -> InputStats:
        seen = x
        x = self._rows(path, prev, quantizer, x)
        tokens = x.shape[0]
        # the quantizer's own per-tensor statistic of the same input reuses this reduction
        source = seen if getattr(quantizer, "pre_quant_scale", None) is None else x
        second = None
        if self.second:
            amax, second = channel_abs_top2(source)
        else:
            amax = channel_abs_max(source)
        if not bool(torch.isfinite(amax).all()):  # max reductions propagate NaN, and Inf is its own max
            raise CalibrationError(
                f"the input of '{path}' holds NaN or Inf during calibration (shape {tuple(x.shape)}); "
                "check the calibration data and the layers before it"
            )
        abs_sum = x.abs().sum(0, dtype=torch.float64) if self.sums else None
        if self.max_tokens <= 0:
            x = x[:0]
        home = self._home(path, x)
        keys = torch.rand(x.shape[0], generator=self._generator(path)).to(home)
        chunks = prev.chunks if prev is not None else ()
        cut = prev.threshold() if prev is not None else None
        if cut is not None:
            # the sample is full: only tokens whose key beats its current cut can enter, so only
            # those are copied (the same sample as ranking every token)
            enter = keys < cut
            keys, rows = keys[enter], x[enter.to(x.device)].to(home)
        else:
            rows = x.to(home, copy=True)  # never a view of the live activation
        chunks = chunks + ((keys, rows),)
        if second is not None and prev is not None:  # the second largest of both top-2s together
            both = torch.stack([prev.amax.to(amax.device), prev.second.to(amax.device), amax, second])
            second = both.topk(2, dim=0).values[1]
        if prev is not None:
            amax = torch.maximum(prev.amax.to(amax.device), amax)
            abs_sum = None if abs_sum is None else prev.abs_sum.to(abs_sum.device) + abs_sum
        new = InputStats(
            amax=amax.to(home), abs_sum=None if abs_sum is None else abs_sum.to(home),
            tokens=(prev.tokens if prev else 0) + tokens, calls=(prev.calls if prev else 0) + 1,
            chunks=chunks, limit=self.max_tokens, grow_to=self.grow_to,
            below=(prev.below if prev is not None else 0) + _below(keys, self.grow_to),
            second=None if second is None else second.to(home),
        )
        if self.max_tokens > 0 and new.candidates > 2 * new.capacity():
            keys, rows = new.compacted()  # compact now and then
            new = dataclasses.replace(new, chunks=((keys, rows),), below=_below(keys, self.grow_to))
        return new
