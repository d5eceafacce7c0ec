"""Pass-only graph copies: the search algorithms' capture passes run their linears through oneDNN
(:mod:`qpass.calib.pass_graph`); every other forward runs the model's own graph."""

import copy

import pytest
import torch
from torch import nn

import qpass
from qpass.calib import pass_graph
from qpass.graph.quantized_model import state_of

pytestmark = pytest.mark.skipif(not pass_graph.available(), reason="this torch build has no oneDNN linear")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        return self.head(x + self.fc2(torch.relu(self.fc1(self.norm(x)))))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 10, 32, generator=g) * 3 for _ in range(3)]


def test_cpu_linear_equals_aten_linear_and_falls_back_outside_its_case():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    for x in (torch.randn(7, 40, generator=g), torch.randn(2, 5, 40, generator=g),
              torch.randn(40, 9, generator=g).t(), torch.randn(0, 40)):
        torch.testing.assert_close(pass_graph.cpu_linear(x, w, b), torch.nn.functional.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pass_graph.cpu_linear(x, w), torch.nn.functional.linear(x, w))
    # bf16 and autograd take aten.linear itself: bit-equal, and gradients flow
    xb = torch.randn(3, 40, generator=g).bfloat16()
    assert torch.equal(pass_graph.cpu_linear(xb, w.bfloat16()), torch.nn.functional.linear(xb, w.bfloat16()))
    xg = torch.randn(3, 40, generator=g, requires_grad=True)
    pass_graph.cpu_linear(xg, w, b).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(3, 40))


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    real = pass_graph._onednn_linear()

    def counting():
        calls.append(1)
        return real

    monkeypatch.setattr(pass_graph, "_onednn_linear", counting)
    return calls


def test_smoothquant_capture_runs_onednn_linears_and_leaves_the_models_graphs_alone(monkeypatch):
    torch.manual_seed(0)
    base, batches = Mlp(), _batches()
    calls = _count_kernel_calls(monkeypatch)
    m = copy.deepcopy(base)
    qpass.quantize(m, copy.deepcopy(qpass.INT8_SMOOTHQUANT_CFG), lambda mm: [mm(x) for x in batches])
    assert len(calls) >= 2 * 3  # fc1 and fc2 on every batch (the head runs only for outputs still read)
    assert not pass_graph._VARIANTS  # the pass copies are gone with the pass
    for graphs in state_of(m).graphs.values():
        for traced in graphs:
            targets = {n.target for n in traced.gm.graph.nodes if n.op == "call_function"}
            assert pass_graph.cpu_linear not in targets and torch.ops.aten.linear.default in targets
    n = len(calls)
    m(batches[0])  # inference: the model's own graph
    assert len(calls) == n


def test_max_calibration_keeps_aten_linear(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    m = Mlp()
    qpass.quantize(m, copy.deepcopy(qpass.INT8_DEFAULT_CFG), lambda mm: [mm(x) for x in _batches()])
    assert calls == []


def test_onednn_capture_gives_the_aten_capture_result_and_defers_the_tail(monkeypatch):
    """With and without the kernels SmoothQuant picks the same alphas, and its amax agree to float
    rounding; the capture pass still skips the work after the last quantizer (the lazy tail
    recognises cpu_linear as a GEMM)."""
    from qpass.graph import lazy_outputs

    torch.manual_seed(0)
    base, batches = Mlp(), _batches()
    cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                         "*input_quantizer": {"num_bits": 8, "axis": None}, "*head*": {"enable": False}},
           "algorithm": {"method": "smoothquant", "alpha": "auto"}}
    results = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("QPASS_FAST_LINEAR", fast)
        pass_graph._onednn_linear.cache_clear()
        splits = []
        real_split = lazy_outputs.split_for
        monkeypatch.setattr(lazy_outputs, "split_for", lambda exe: splits.append(real_split(exe)) or splits[-1])
        m = copy.deepcopy(base)
        qpass.quantize(m, copy.deepcopy(cfg), lambda mm: [mm(x) for x in batches])
        monkeypatch.setattr(lazy_outputs, "split_for", real_split)
        assert splits and all(s is not None for s in splits)  # the head's GEMM stays deferred
        results[fast] = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("_amax")}
    pass_graph._onednn_linear.cache_clear()
    assert results["1"].keys() == results["0"].keys() and results["1"]
    for k in results["1"]:
        torch.testing.assert_close(results["1"][k], results["0"][k], rtol=1e-5, atol=1e-7)


def test_fast_linear_env_switch(monkeypatch):
    monkeypatch.setenv("QPASS_FAST_LINEAR", "0")
    pass_graph._onednn_linear.cache_clear()
    try:
        assert not pass_graph.available()
        x, w = torch.randn(3, 8), torch.randn(4, 8)
        assert torch.equal(pass_graph.cpu_linear(x, w), torch.nn.functional.linear(x, w))
    finally:
        monkeypatch.delenv("QPASS_FAST_LINEAR")
        pass_graph._onednn_linear.cache_clear()
