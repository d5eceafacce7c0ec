"""Reusing a traced graph for another model of the same architecture."""

import copy

import torch

import qpass
from qpass.graph import graph_cache, trace

from conftest import Attention


def _count_exports(monkeypatch):
    calls = []
    real = trace.export_graph

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(graph_cache, "export_graph", counting)
    return calls


def test_same_architecture_reuses_graph_and_binds_its_own_weights(attention, monkeypatch):
    graph_cache.clear()
    calls = _count_exports(monkeypatch)
    x = torch.randn(2, 5, 32)
    other = copy.deepcopy(attention)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ref_other = other(x)
    qpass.quantize(attention, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=x)
    qpass.quantize(other, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=x)
    assert len(calls) == 1
    qpass.disable_quantizer(other, "*")
    torch.testing.assert_close(other(x), ref_other, rtol=0, atol=0)


def test_different_scalar_attribute_is_traced_again(monkeypatch):
    graph_cache.clear()
    calls = _count_exports(monkeypatch)
    torch.manual_seed(0)
    a, b = Attention().eval(), Attention().eval()
    b.heads = 2  # same parameters, different computation
    x = torch.randn(2, 5, 32)
    ref_b = b(x)
    qpass.quantize(a, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=x)
    qpass.quantize(b, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=x)
    assert len(calls) == 2
    qpass.disable_quantizer(b, "*")
    torch.testing.assert_close(b(x), ref_b, rtol=0, atol=0)


def test_hf_kernel_choice_is_part_of_the_architecture():
    """transformers keeps the attention/experts implementation in private config attributes its
    JSON leaves out: an eager-attention Llama after an SDPA one must get a graph of its own (only
    there is the softmax a separate op that softmax_quantizer can read)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(impl):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
        return LlamaForCausalLM(cfg).eval()

    sdpa, eager = llama("sdpa"), llama("eager")
    assert (graph_cache.structure_fingerprint(sdpa, type(sdpa))
            != graph_cache.structure_fingerprint(eager, type(eager)))
    graph_cache.clear()
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*softmax_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    x = torch.randint(0, 128, (2, 8))
    qpass.quantize(sdpa, copy.deepcopy(cfg), lambda m: m(x))
    qpass.quantize(eager, copy.deepcopy(cfg), lambda m: m(x))
    assert eager.model.layers[0].self_attn.softmax_quantizer.amax is not None


def test_export_restores_tracing_settings_even_when_it_fails():
    """export_graph switches off the fake-tensor cache and stack traces for its own trace only."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.config as fx_config

    before = (dynamo_config.fake_tensor_cache_enabled, fx_config.do_not_emit_stack_traces)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append((dynamo_config.fake_tensor_cache_enabled, fx_config.do_not_emit_stack_traces))
            return x * 2

    class Broken(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch: torch.export refuses it
                return x
            return -x

    traced = trace.export_graph(Spy(), Spy, (torch.randn(2, 3),), {})
    assert seen and seen[0] == (False, True)
    assert (dynamo_config.fake_tensor_cache_enabled, fx_config.do_not_emit_stack_traces) == before
    x = torch.randn(4, 5)
    torch.testing.assert_close(traced.gm(x), x * 2)
    try:
        trace.export_graph(Broken(), Broken, (torch.randn(2, 3),), {})
    except qpass.TraceError:
        pass
    else:
        raise AssertionError("a data-dependent branch must not trace")
    assert (dynamo_config.fake_tensor_cache_enabled, fx_config.do_not_emit_stack_traces) == before


def test_traced_graph_code_is_generated_once_at_the_end(monkeypatch):
    """With a warm graph cache, quantize generates the traced graph's Python code once, when
    calibration ends (the rebind and the quantizer insertion leave it lazy), and the execution
    copy follows later recompiles."""
    from torch import fx

    from qpass.graph.execution import execution_graph
    from qpass.graph.quantized_model import state_of
    from qpass.graph.trace import TracedGraphModule, graph_version

    from conftest import tiny_llama

    graph_cache.clear()
    ids = torch.randint(0, 128, (2, 12))
    loop = lambda m: m(input_ids=ids, use_cache=False)  # noqa: E731
    qpass.quantize(tiny_llama(), copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)  # fills the cache
    generated = []
    real = fx.Graph.python_code

    def counting(self, *a, **k):
        generated.append(len(self.nodes))
        return real(self, *a, **k)

    monkeypatch.setattr(fx.Graph, "python_code", counting)
    model = qpass.quantize(tiny_llama(), copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)
    (traced,) = [t for ts in state_of(model).graphs.values() for t in ts]
    gm = traced.gm
    assert isinstance(gm, TracedGraphModule)
    # the calibration pass's head, and the traced graph once at the end (the tail, which computes
    # the outputs this forward_loop never reads, is never generated)
    assert len(generated) == 2, generated
    assert generated[-1] == len(gm.graph.nodes)
    assert "def forward" in gm.code  # realized: torch.compile inlines this forward

    exe = execution_graph(gm)
    before = graph_version(gm)
    assert execution_graph(gm) is exe  # nothing changed
    gm.recompile()  # an edit: the copy is rebuilt
    assert graph_version(gm) != before
    assert execution_graph(gm) is not exe
