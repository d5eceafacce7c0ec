"""Graph segments: prefix / one per block / suffix, live values, pruning towards sinks, devices."""

import pytest
import torch
from torch import nn

from conftest import MLP, tiny_bert, tiny_llama
from qpass.errors import QpassError
from qpass.graph.segments import find_blocks, flat_inputs, partition, retarget_devices, run_segments, segment_module
from qpass.graph.trace import export_graph
from qpass.passes.insert_quantizers import owner_path


def _traced(model, *args):
    return export_graph(model, type(model), args, {}).gm


@pytest.fixture(scope="module")
def llama_graph():
    m = tiny_llama(layers=2, tie=False)
    x = torch.randint(0, 128, (2, 8))
    return m, export_graph(m, type(m), (), {"input_ids": x, "use_cache": False}).gm, x


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        return sum(e(x) for e in self.experts)


class Stack(nn.Module):
    def __init__(self, interleave=False):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList(Experts() for _ in range(2))
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # no parameters: not blocks
        self.interleave = interleave

    def forward(self, x):
        h = self.inp(x)
        if self.interleave:  # layer 1's first expert runs between layer 0's experts
            a = self.layers[0].experts[0](h)
            b = self.layers[1].experts[0](h)
            return self.layers[0].experts[1](a) + b
        for layer in self.layers:
            h = layer(h)
        return h


def test_find_blocks_takes_outermost_module_lists_with_parameters(llama_graph):
    assert find_blocks(llama_graph[0]) == ["model.layers.0", "model.layers.1"]
    assert find_blocks(Stack()) == ["layers.0", "layers.1"]  # not layers.0.experts.*, not acts.*
    assert find_blocks(MLP()) == []


def test_llama_segments_prefix_blocks_suffix(llama_graph):
    model, gm, _ = llama_graph
    part = partition(gm, find_blocks(model))
    names = ["prefix", "model.layers.0", "model.layers.1", "glue after model.layers.1"]
    assert [s.name for s in part.segments] == names
    prefix, l0, l1, suffix = part.segments
    # each block reads exactly its own weights
    for seg, i in ((l0, 0), (l1, 1)):
        own = {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}
        assert set(seg.attrs) == own
        assert all(owner_path(n).startswith(f"model.layers.{i}") for n in seg.nodes if n.op == "call_function")
    assert "model.embed_tokens.weight" in prefix.attrs and "lm_head.weight" in suffix.attrs
    # block 0's output is block 1's input; the rotary tables from the prefix reach both blocks
    assert l0.outputs and set(l0.outputs) <= set(l1.inputs)
    shared = set(prefix.outputs) & set(l0.inputs) & set(l1.inputs)
    assert any(n.meta["val"].dtype.is_floating_point for n in shared if isinstance(n.meta.get("val"), torch.Tensor))
    assert set(suffix.inputs) == set(l1.outputs)
    # values die after their last reader: nothing from block 0 is read after block 1
    assert all(part.last_use[n] <= 2 for n in l0.outputs)


def test_segments_reproduce_the_graph_bit_for_bit(llama_graph):
    _, gm, x = llama_graph
    part = partition(gm, ["model.layers.0", "model.layers.1"])
    assert torch.equal(run_segments(part, [x]).logits, gm(x).logits)


def test_bert_segments_reproduce_the_graph():
    m = tiny_bert(layers=2)
    assert find_blocks(m) == ["encoder.layer.0", "encoder.layer.1"]
    ids, mask = torch.randint(0, 128, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    gm = export_graph(m, type(m), (), {"attention_mask": mask, "input_ids": ids}).gm
    part = partition(gm, find_blocks(m))
    assert [s.block for s in part.segments][1:3] == ["encoder.layer.0", "encoder.layer.1"]
    ref, out = gm(mask, ids), run_segments(part, [mask, ids])
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)


def test_partition_towards_sinks_drops_what_they_do_not_need(llama_graph):
    _, gm, _ = llama_graph
    sink = next(n for n in gm.graph.nodes
                if n.op == "call_function" and owner_path(n) == "model.layers.0.mlp.down_proj")
    part = partition(gm, ["model.layers.0", "model.layers.1"], sinks=[sink])
    assert [s.name for s in part.segments] == ["prefix", "model.layers.0"]
    assert part.segments[-1].nodes[-1] is sink and part.segments[-1].outputs == []
    assert part.returns is None
    with pytest.raises(QpassError, match="full graph"):
        run_segments(part, [torch.zeros(1, 1, dtype=torch.long)])


def test_interleaved_blocks_are_refused():
    m = Stack(interleave=True).eval()
    gm = _traced(m, torch.randn(2, 8))
    with pytest.raises(QpassError, match="'layers.0' runs in two separate parts"):
        partition(gm, find_blocks(m))


def test_retarget_rewrites_baked_devices_so_a_segment_runs_elsewhere(llama_graph):
    """The prefix traced on the CPU (arange(device=cpu), to(cpu)) runs on another device
    (meta here: no data, but any leftover CPU constant would fail the run)."""
    _, gm, x = llama_graph
    part = partition(gm, ["model.layers.0", "model.layers.1"])
    prefix = part.segments[0]
    cpu, meta = torch.device("cpu"), torch.device("meta")
    baked = [n for n in prefix.nodes if torch.device("cpu") in torch.utils._pytree.tree_leaves((n.args, n.kwargs))]
    assert baked, "the tiny Llama's prefix creates tensors on the trace device"
    moved = segment_module(part, prefix, attr=lambda t, v: v.to(meta) if isinstance(v, torch.Tensor) else v,
                           devices=(cpu, meta))
    leaves = [a for n in moved.graph.nodes for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs))]
    assert cpu not in leaves
    env = dict(zip(part.placeholders, flat_inputs(gm, [x.to(meta)])))
    outs = moved(*[env[n] for n in prefix.inputs])
    assert all(o.device == meta for o in outs if isinstance(o, torch.Tensor))
    assert retarget_devices({"device": cpu, "x": [cpu, 1]}, cpu, meta) == {"device": meta, "x": [meta, 1]}
