"""Give attention back its causal flag where the traced graph builds the causal mask itself.

(Also: an all-True mask built from sizes, which HF builds for an encoder called without an
attention mask, is dropped.)

Run eagerly with no padding, an HF decoder calls ``scaled_dot_product_attention`` with
``is_causal=True`` and no mask. Under torch.export it cannot assume that for every shape, so
the traced graph builds a ``[batch, 1, seq, seq]`` boolean mask from aranges (and HF's
packed-sequence check) on every forward and passes it to SDPA, which then cannot take its
causal kernels: no FlashAttention on CUDA, no block skipping on the CPU (one 1x2048 SDPA call
with SmolLM2's heads: 68 ms with the mask, 39 ms causal, same values).

:func:`recover_causal_masks` rewrites ``sdpa(q, k, v, mask)`` to ``sdpa(q, k, v, is_causal=True)``
when all of these hold:

1. the mask is computed from sizes alone: walking up from it reaches no input tensor, parameter,
   buffer or module, only ``sym_size`` of inputs, size arithmetic and tensors created from
   constants (aranges), with no random op;
2. dropout is 0, the query and key lengths are the same size (one symbol, or one number), and the
   mask's last two dims are that size;
3. evaluated at sequence lengths 2, 3, 17, 130 and 1031 (batch 2 or 3), the mask is the boolean
   lower triangle, broadcast to its shape (or all True at every length: then the mask is dropped
   and attention stays non-causal);
4. no number in the mask's code lies between 1031 and 2**62 (slice ends use 2**63 - 1): a pattern
   that only starts beyond the lengths evaluated, such as a sliding window of 4096, needs such a
   constant, and its mask is left alone.

Anything else (padding masks, sliding windows, float masks, KV-cache offsets) keeps its mask.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["SYMBOLS_META", "recover_causal_masks"]

#: node meta of nodes a stitched graph copied from a block's own trace: each size symbol of
#: their shapes -> that size in the stitched graph's symbols (see qpass.graph.block_export)
SYMBOLS_META = "qpass_symbols"

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
#: (batch, sequence) sizes the mask is evaluated at
TRIALS = ((2, 2), (3, 3), (2, 17), (3, 130), (2, 1031))
_LARGEST = max(s for _, s in TRIALS)
_SENTINEL = 2**62
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson", "exponential")


def recover_causal_masks(graph: fx.Graph) -> int:
    """Rewrite every qualifying SDPA call of ``graph`` in place (causal, or without its all-True
    mask); returns how many. The mask's nodes are left for the caller's dead-code elimination."""
    done = 0
    verdicts: dict[fx.Node, bool] = {}  # one mask usually feeds every layer
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        parts = _sdpa_parts(node)
        if parts is None:
            continue
        q, k, v, mask, kwargs = parts
        length = _same_length(q, k, mask)
        if length is None:
            continue
        if mask not in verdicts:
            verdicts[mask] = _mask_kind(mask, length)
        if verdicts[mask] is not None:
            node.args = (q, k, v)
            node.kwargs = {**kwargs, "is_causal": True} if verdicts[mask] == "causal" else kwargs
            done += 1
    for mask, kind in verdicts.items():
        if kind is not None:
            _release(graph, mask)
    return done


def _release(graph: fx.Graph, mask: fx.Node) -> None:
    """Leave nothing that keeps the mask's code alive: a block's code may still read the mask's
    sizes (its batch dim), which it then reads from an input instead, and export's dtype checks
    of the mask's intermediates go with them."""
    nodes, _ = _subgraph(mask)
    for n in nodes:
        for user in list(n.users):
            if user.target is torch.ops.aten._assert_tensor_metadata.default and not user.users:
                graph.erase_node(user)
    sizes = {}  # size expression -> a sym_size node of a graph input
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[0].op == "placeholder":
            val = n.meta.get("val")
            if isinstance(val, torch.SymInt):
                sizes.setdefault(val.node.expr, n)
    for user in list(mask.users):
        if user.op != "call_function" or user.target is not torch.ops.aten.sym_size.int:
            continue
        val = user.meta.get("val")
        key = _size_key(val, user) if isinstance(val, torch.SymInt) else None
        if key in sizes:
            user.replace_all_uses_with(sizes[key])


def _sdpa_parts(node: fx.Node):
    names = ("attn_mask", "dropout_p", "is_causal")
    args = list(node.args[3:6])
    values = {n: (args[i] if i < len(args) else node.kwargs.get(n)) for i, n in enumerate(names)}
    mask, dropout, causal = values["attn_mask"], values["dropout_p"], values["is_causal"]
    if not isinstance(mask, fx.Node) or dropout not in (None, 0, 0.0) or causal not in (None, False):
        return None
    q, k, v = node.args[:3]
    kwargs = {key: val for key, val in node.kwargs.items() if key not in names}
    return q, k, v, mask, kwargs


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _size_key(s, node: fx.Node):
    """An int, or the sympy expression of a SymInt, in the graph's own symbols."""
    if not isinstance(s, torch.SymInt):
        return int(s)
    expr = s.node.expr
    symbols = node.meta.get(SYMBOLS_META)
    if symbols:
        expr = expr.xreplace(symbols)
        value = _as_int(expr)
        if value is not None:
            return value
    return expr


def _as_int(value) -> int | None:
    """``value`` as an int if it is one (a Python int, or a sympy Integer), else None."""
    if isinstance(value, int):
        return value
    return int(value) if getattr(value, "is_Integer", False) else None


def _same_length(q, k, mask):
    """The query length when it equals the key length and the mask's last two dims."""
    vq, vk, vm = _val(q), _val(k), _val(mask)
    if vq is None or vk is None or vm is None or vm.dtype is not torch.bool:
        return None
    if vq.dim() < 2 or vk.dim() < 2 or vm.dim() < 2:
        return None
    length = _size_key(vq.shape[-2], q)
    if any(_size_key(s, n) != length for s, n in ((vk.shape[-2], k), (vm.shape[-2], mask), (vm.shape[-1], mask))):
        return None
    if not isinstance(length, int) and not getattr(length, "is_Symbol", False):
        return None
    return length


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)


def _subgraph(mask: fx.Node):
    """The nodes computing ``mask`` in graph order and its size inputs, or None (rule 1, 4)."""
    nodes, sizes, seen, stack = [], [], set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            sizes.append(n)
            continue
        if n.op != "call_function" or n.is_impure():
            return None
        name = str(n.target)
        if any(r in name for r in _RANDOM):
            return None
        for c in _numbers((n.args, n.kwargs)):
            if c == c and abs(c) != float("inf") and _LARGEST < abs(c) < _SENTINEL:
                return None
        nodes.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), sizes


def _mask_kind(mask: fx.Node, length) -> str | None:
    """"causal" (the lower triangle), "full" (all True) or None (anything else, or unknown)."""
    found = _subgraph(mask)
    if found is None:
        return None
    nodes, sizes = found
    g = fx.Graph()
    env = {s: g.placeholder(f"size{i}") for i, s in enumerate(sizes)}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[mask])
    fn = fx.GraphModule(torch.nn.Module(), g)
    seq_symbols = set() if isinstance(length, int) else {length}
    trials = [(2, length)] if isinstance(length, int) else TRIALS
    kinds = {"causal", "full"}
    for batch, seq in trials:
        values = []
        for s in sizes:
            val = s.meta.get("val")
            if isinstance(val, int):
                values.append(val)
                continue
            if not isinstance(val, torch.SymInt):
                return None
            expr = _size_key(val, s)  # a size read inside a stitched block: in the graph's symbols
            bound = expr if isinstance(expr, int) else \
                _as_int(expr.xreplace({sym: (seq if sym in seq_symbols else batch) for sym in expr.free_symbols}))
            if bound is None:
                return None
            values.append(bound)
        try:
            with torch.no_grad():
                got = fn(*values)
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate stays as it is
            return None
        if not isinstance(got, torch.Tensor) or got.dtype is not torch.bool or got.dim() < 2 \
                or got.shape[-1] != seq or got.shape[-2] != seq:
            return None
        ones = torch.ones(seq, seq, dtype=torch.bool, device=got.device)
        kinds &= {kind for kind, want in (("causal", ones.tril()), ("full", ones)) if torch.equal(got, want.expand_as(got))}
        if not kinds:
            return None
    return "full" if "full" in kinds else "causal"  # one token: either reads the same

