"""Cut a traced graph into segments that run one after another: the blocks and the glue.

A *block* is a child of an ``nn.ModuleList`` (``model.layers.3``, ``encoder.layer.0``): the
graph knows which block owns each op from ``node.meta["nn_module_stack"]``. The ops
between blocks are *glue*: the prefix (embeddings, masks, rotary tables), anything between
two blocks, and the suffix (final norm, head). A segment is a maximal run of graph nodes
with the same owner; a segment's *inputs* are the values it reads from graph inputs or
from earlier segments, its *outputs* the values later segments (or the graph's output)
read. Parameters and buffers are not values: each segment reads its own ``get_attr``
nodes, so its module holds exactly the weights it uses (what layer-by-layer calibration
moves to the device while the segment runs).

Partitioning towards ``sinks`` keeps only the nodes those sinks depend on: layerwise
calibration asks for the quantizers that observe data, which drops the head of an LM
(the logits nobody reads during calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from qpass.errors import QpassError
from qpass.graph.trace import fetch_attr
from qpass.passes.insert_quantizers import owner_path


@dataclass
class Segment:
    block: str | None  # module path of the block; None for glue
    after: str | None  # glue: the block it follows (None: the prefix); blocks: their own path
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    attrs: list[str] = field(default_factory=list)  # get_attr targets: weights, buffers, constants

    @property
    def key(self) -> tuple:
        """Identifies the segment across graphs of one model (other input structures)."""
        return ("block", self.block) if self.block is not None else ("glue", self.after)

    @property
    def name(self) -> str:
        if self.block is not None:
            return self.block
        return "prefix" if self.after is None else f"glue after {self.after}"


@dataclass
class Partition:
    gm: fx.GraphModule
    segments: list[Segment]
    placeholders: list[fx.Node]
    last_use: dict  # value node -> index of the last segment reading it (len(segments): the graph output)
    returns: fx.Node | None  # the output node when partitioned for the full output, else None


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks: children (with parameters) of the outermost ModuleLists."""
    blocks: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(path == b or path.startswith(b + ".") for b in blocks):
            continue  # a list inside a block (MoE experts): the block is the unit
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                blocks.append(f"{path}.{name}" if path else name)
    return blocks


def _block_of(path: str, blocks: set[str], cache: dict) -> str | None:
    if path not in cache:
        p, found = path, None
        while p:
            if p in blocks:
                found = p
                break
            p = p.rpartition(".")[0]
        cache[path] = found
    return cache[path]


def _needed(graph: fx.Graph, sinks: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(sinks)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def partition(gm: fx.GraphModule, blocks: Iterable[str], sinks: Iterable[fx.Node] | None = None) -> Partition:
    """Segments of ``gm`` in execution order.

    ``sinks``: the nodes whose inputs must be computed (they are kept too); None keeps what
    the graph's output needs, and the last segments then return the output's values.
    """
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    full = sinks is None
    needed = _needed(graph, [output] if full else list(sinks))
    compute = [n for n in graph.nodes if n in needed and n.op in ("call_function", "call_module", "call_method")]
    block_set, cache = set(blocks), {}
    owners = [_block_of(owner_path(n), block_set, cache) for n in compute]
    _absorb_sandwiched_glue(owners)

    segments: list[Segment] = []
    index: dict[fx.Node, int] = {}
    last_block: str | None = None
    done: set[str] = set()
    for node, owner in zip(compute, owners):
        if not segments or segments[-1].block != owner:
            if owner is not None:
                if owner in done:
                    raise QpassError(
                        f"block '{owner}' runs in two separate parts of the graph (its ops interleave with "
                        f"'{segments[-1].name}'); layer-by-layer calibration needs each block's ops in one run"
                    )
                done.add(owner)
                last_block = owner
            segments.append(Segment(block=owner, after=owner if owner is not None else last_block))
        segments[-1].nodes.append(node)
        index[node] = len(segments) - 1

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last_use: dict[fx.Node, int] = {}
    for i, seg in enumerate(segments):
        ins, attrs = [], []
        for node in seg.nodes:
            for src in node.all_input_nodes:
                if src.op == "get_attr":
                    if src.target not in attrs:
                        attrs.append(src.target)
                elif index.get(src) != i and src not in ins:
                    ins.append(src)
                if src.op != "get_attr":
                    last_use[src] = max(last_use.get(src, -1), i)
        seg.inputs, seg.attrs = ins, attrs
    if full:
        for src in output.all_input_nodes:
            last_use[src] = len(segments)
    for i, seg in enumerate(segments):
        seg.outputs = [n for n in seg.nodes if last_use.get(n, -1) > i]
    return Partition(gm=gm, segments=segments, placeholders=placeholders, last_use=last_use,
                     returns=output if full else None)


def _absorb_sandwiched_glue(owners: list) -> None:
    """Ownerless ops between two ops of one block (shape queries, asserts) belong to it."""
    i = 0
    while i < len(owners):
        if owners[i] is not None:
            i += 1
            continue
        j = i
        while j < len(owners) and owners[j] is None:
            j += 1
        if 0 < i and j < len(owners) and owners[i - 1] == owners[j]:
            owners[i:j] = [owners[j]] * (j - i)
        i = j


def retarget_devices(value, source: torch.device, target: torch.device):
    """``value`` (a node's args or kwargs) with every ``torch.device`` equal to ``source`` replaced.

    torch.export bakes the trace's device into ops that create tensors (``arange(device=...)``,
    ``to(device)``); a segment traced on the CPU but run on the GPU needs them rewritten.
    """
    return pytree.tree_map(lambda v: target if isinstance(v, torch.device) and v == source else v, value)


def segment_module(part: Partition, seg: Segment, attr: Callable | None = None,
                   devices: tuple[torch.device, torch.device] | None = None) -> fx.GraphModule:
    """A GraphModule running ``seg``: ``forward(*inputs) -> tuple(outputs)``.

    ``attr(target, value)`` may replace each weight/buffer the segment reads (a device copy);
    quantizer modules are the model's own. ``devices=(source, target)`` rewrites device
    constants baked into the graph.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}
    for n in seg.inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta.update(n.meta)
    for target in seg.attrs:
        value = fetch_attr(part.gm, target)
        root[target] = attr(target, value) if attr is not None else value
    for node in seg.nodes:
        for src in node.all_input_nodes:
            if src.op == "get_attr" and src not in env:
                env[src] = graph.get_attr(src.target)
        new = graph.node_copy(node, lambda x: env[x])
        if devices is not None and devices[0] != devices[1]:
            new.args = retarget_devices(new.args, *devices)
            new.kwargs = retarget_devices(new.kwargs, *devices)
        if node.op == "call_module":
            root[node.target] = fetch_attr(part.gm, node.target)
        env[node] = new
    graph.output(tuple(env[n] for n in seg.outputs))
    return fx.GraphModule(root, graph)


def release(module: fx.GraphModule, seg: Segment) -> None:
    """Drop the weights and buffers a segment module holds, now.

    A GraphModule and its graph reference each other, so without this the device copies
    of a block's weights would live until the next garbage collection, not until the
    block is done.
    """
    for target in seg.attrs:
        parent_path, _, leaf = target.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        parent._parameters.pop(leaf, None)
        parent._buffers.pop(leaf, None)
        parent.__dict__.pop(leaf, None)


def flat_inputs(gm: fx.GraphModule, args: Iterable) -> list:
    """The placeholder values ``gm(*args)`` binds (the graph's own input flattening)."""
    return list(gm.graph._codegen.process_inputs(*args))


def run_segments(part: Partition, args: Iterable):
    """Run the whole partition on ``args`` segment by segment: the graph's own result.

    The reference execution (tests and debugging); layerwise calibration schedules segments
    over many batches itself.
    """
    if part.returns is None:
        raise QpassError("run_segments needs a partition of the full graph (sinks=None)")
    env = dict(zip(part.placeholders, flat_inputs(part.gm, args)))
    for seg in part.segments:
        outs = segment_module(part, seg)(*[env[n] for n in seg.inputs])
        env.update(zip(seg.outputs, outs))
    out = part.returns.args[0]
    result = fx.node.map_arg(out, lambda n: env[n] if n.op != "get_attr" else fetch_attr(part.gm, n.target))
    return part.gm.graph._codegen.process_outputs(result)
