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
