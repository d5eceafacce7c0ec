"""Block-wise export: one traced block per kind, stamped into the whole-model graph."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import qpass
from qpass.graph import block_export, graph_cache, trace

from conftest import tiny_bert, tiny_llama


def _flat(args, kwargs):
    return [x for x in pytree.tree_leaves((args, dict(sorted(kwargs.items())))) if isinstance(x, torch.Tensor)]


def _ops(gm):
    return Counter(str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and "sym_size" not in str(n.target))


def _owners(gm):
    out = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            out[list(n.meta["nn_module_stack"].values())[-1]] += 1
    return out


def _compare_with_whole_export(model, kwargs, other_kwargs):
    whole = trace.export_graph(model, type(model), (), kwargs)
    stitched = block_export.export_with_blocks(model, type(model), (), kwargs)
    assert stitched is not None
    assert _ops(stitched.gm) == _ops(whole.gm)
    assert _owners(stitched.gm) == _owners(whole.gm)
    # the same specialised dims; a range the stitched graph states, the whole graph states too (the
    # whole export may bound more inputs: BERT's mask shares its sequence bound with the ids there)
    assert [trace.fixed_dims(d) for d in stitched.static_dims] == [trace.fixed_dims(d) for d in whole.static_dims]
    for mine, theirs in zip(stitched.static_dims, whole.static_dims):
        assert {k: v for k, v in (mine or {}).items() if isinstance(v, tuple)}.items() <= (theirs or {}).items()
    with torch.no_grad():
        expected = model(**other_kwargs)
        got = stitched.gm(*_flat((), other_kwargs))
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected)):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    get_attrs = {n.target for n in stitched.gm.graph.nodes if n.op == "get_attr"}
    params = dict(model.named_parameters())
    for target in get_attrs & set(params):
        assert stitched.gm.get_parameter(target) is params[target]  # the model's own tensors, not copies
    return stitched


def test_llama_blocks_stitch_to_the_whole_model_graph():
    model = tiny_llama(layers=4)
    kwargs = dict(input_ids=torch.randint(0, 128, (2, 12)), use_cache=False)
    other = dict(input_ids=torch.randint(0, 128, (3, 7)), use_cache=False)
    stitched = _compare_with_whole_export(model, kwargs, other)
    owners = {p for p, _ in _owners(stitched.gm)}
    assert {f"model.layers.{i}.mlp.gate_proj" for i in range(4)} <= owners


def test_bert_blocks_with_a_padding_mask():
    model = tiny_bert(layers=3)
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    other_mask = torch.ones(3, 5, dtype=torch.long)
    other_mask[0, 3:] = 0
    _compare_with_whole_export(model, dict(input_ids=ids, attention_mask=mask),
                               dict(input_ids=torch.randint(0, 128, (3, 5)), attention_mask=other_mask))


class _Block(nn.Module):
    def __init__(self, d, layer_idx, scale_by_index=False, shared=None):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.layer_idx = layer_idx
        self.scale_by_index = scale_by_index
        self.shared = [shared]  # a module the block uses but does not own

    def forward(self, x, flag=True):
        y = self.fc(x) if self.shared[0] is None else nn.functional.linear(x, self.shared[0].weight)
        if self.scale_by_index:  # numerics depend on the layer index: blocks must not be stamped
            y = y / (self.layer_idx + 1)
        return x + (y if flag else -y)


class _Stack(nn.Module):
    def __init__(self, n=3, d=8, scale_by_index=False, flags=None, outside=False):
        super().__init__()
        self.head = nn.Linear(d, d)
        # outside: every block reads the head's weight, which is not the block's own state
        self.blocks = nn.ModuleList(_Block(d, i, scale_by_index, self.head if outside else None) for i in range(n))
        self.flags = flags or [True] * n

    def forward(self, x):
        for block, flag in zip(self.blocks, self.flags):
            x = block(x, flag=flag)
        return self.head(x)


def test_plain_stack_is_stitched():
    torch.manual_seed(0)
    model = _Stack().eval()
    x = torch.randn(2, 5, 8)
    traced = block_export.export_with_blocks(model, type(model), (x,), {})
    assert traced is not None
    for shape in ((3, 7, 8), (1, 1, 8), (5, 2, 8)):
        y = torch.randn(shape)
        torch.testing.assert_close(traced.gm(y), model(y), rtol=0, atol=0)
    expected = {(f"blocks.{i}.fc", "torch.nn.modules.linear.Linear"): 1 for i in range(3)}
    assert _owners(traced.gm) == Counter({**expected, ("head", "torch.nn.modules.linear.Linear"): 1})


@pytest.mark.parametrize("case", ["index_numerics", "other_constant", "outside_state", "disabled", "training"])
def test_falls_back_to_the_whole_export(case, monkeypatch):
    torch.manual_seed(0)
    model = {
        "index_numerics": lambda: _Stack(scale_by_index=True),
        "other_constant": lambda: _Stack(flags=[True, False, True]),
        "outside_state": lambda: _Stack(outside=True),
        "disabled": lambda: _Stack(),
        "training": lambda: _Stack(),
    }[case]().eval()
    if case == "disabled":
        monkeypatch.setenv("QPASS_BLOCK_EXPORT", "0")
    if case == "training":
        model.train()
    x = torch.randn(2, 5, 8)
    assert block_export.export_with_blocks(model, type(model), (x,), {}) is None
    # quantize still works, through the whole-model export, with the right numerics
    graph_cache.clear()
    model.eval()
    ref = model(x)
    qpass.quantize(model, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=x)
    qpass.disable_quantizer(model, "*")
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_quantize_is_identical_with_and_without_block_export(monkeypatch):
    kwargs = dict(input_ids=torch.randint(0, 128, (2, 16)))
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("QPASS_BLOCK_EXPORT", flag)
        graph_cache.clear()
        model = tiny_llama(layers=3)
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(**kwargs))
        amax = {n: b.clone() for n, b in model.state_dict().items() if n.endswith("_amax")}
        with torch.no_grad():
            results.append((sorted(n for n, _ in model.named_modules()), amax, model(**kwargs).logits))
    (names_a, amax_a, out_a), (names_b, amax_b, out_b) = results
    assert names_a == names_b
    assert amax_a.keys() == amax_b.keys() and len(amax_a) > 0
    for k in amax_a:
        torch.testing.assert_close(amax_a[k], amax_b[k], rtol=0, atol=0)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


def test_block_output_structure_comes_from_fake_tensors():
    """Step 2 learns a block's outputs without running it (shapes only), and runs it for real
    when its inputs hold an object the block could update in place (a KV cache)."""
    from transformers import DynamicCache

    model = tiny_llama(layers=3)
    kinds = block_export.block_kinds(model)
    layer = kinds[0].members[0][2]
    real_calls = []  # per run of the block's MLP: were its inputs real tensors?
    layer.mlp.register_forward_pre_hook(
        lambda m, a, kw: real_calls.append(not any(
            isinstance(x, torch._subclasses.fake_tensor.FakeTensor) for x in pytree.tree_leaves((a, kw)))),
        with_kwargs=True)
    kwargs = dict(input_ids=torch.randint(0, 128, (2, 12)), use_cache=False)
    block_export._record(model, type(model), (), kwargs, kinds)
    assert real_calls == [False]  # one call, on fake tensors
    assert kinds[0].out_dtypes == [torch.float32] and kinds[0].out_shape_from

    h = torch.randn(2, 5, model.config.hidden_size)
    assert block_export._fake_outputs(layer, (h,), dict(past_key_values=DynamicCache())) is None
    out = block_export._fake_outputs(layer, (h,), dict(position_embeddings=model.model.rotary_emb(
        h, torch.arange(5)[None].expand(2, 5))))
    assert isinstance(out, torch.Tensor) and out.shape == h.shape


class _Picky(nn.Module):
    """A block whose code depends on its sequence length beyond a range: a multiple of 8, or at least 8."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[1] % 8 == 0:
            y = y * 2
        if x.shape[1] >= 8:
            y = y + 1
        return y


class _PickyStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Picky() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("block_export", ["1", "0"])
def test_inputs_a_graph_was_not_traced_for_get_their_own_graph(block_export, monkeypatch):
    """A graph traced at sequence 16 checks more than dynamic dims: here a multiple of 8 and at least 8.
    Other lengths take their own graph (before: torch's bare 'Guard failed' or a wrong view)."""
    monkeypatch.setenv("QPASS_BLOCK_EXPORT", block_export)
    graph_cache.clear()
    torch.manual_seed(0)
    model = _PickyStack().eval()
    expected = {s: model(torch.randn(2, s, 8, generator=torch.Generator().manual_seed(s))) for s in (16, 12, 4, 24)}
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 16, 8)))
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        for s, want in expected.items():
            got = model(torch.randn(2, s, 8, generator=torch.Generator().manual_seed(s)))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"sequence {s}")
    from qpass.graph.quantized_model import state_of

    assert sum(len(g) for g in state_of(model).graphs.values()) == 3  # 16 and 24 share one
