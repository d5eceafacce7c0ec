"""auto_quantize's internal calibration loops: once a batch is known to call the model once,
later batches stop each graph after its last quantizer, with the same calibration result."""

import copy

import torch
from torch import nn

import qpass
from qpass.auto_quantize.search import _CalibrationLoops
from qpass.graph.quantized_model import quantizers_head, state_of
from qpass.passes.insert_quantizers import QUANTIZER_META


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids)))).softmax(-1)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (2, 7), generator=g) for _ in range(3)]


def _amax(model):
    return {n: m.amax.clone() for n, m in model.named_modules() if getattr(m, "amax", None) is not None}


def test_truncated_loop_calibrates_identically_and_skips_the_tail():
    torch.manual_seed(0)
    base = Head()
    plain = qpass.quantize(copy.deepcopy(base), "FP8_DEFAULT_CFG", lambda m: [m(b) for b in _batches()])
    loops = _CalibrationLoops(lambda m, b: m(b))
    cut = qpass.quantize(copy.deepcopy(base), "FP8_DEFAULT_CFG", loops.over(_batches()))
    assert loops.calls_per_batch == 1
    want, got = _amax(plain), _amax(cut)
    assert want.keys() == got.keys() and "head.input_quantizer" in want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    traced = next(t for ts in state_of(cut).graphs.values() for t in ts)
    assert traced.head is not None and traced.head[2] is not None  # built (only) by the truncated batches
    head = quantizers_head(traced)
    ops = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert torch.ops.aten.linear.default in ops(traced.gm)
    assert ops(head).count(torch.ops.aten.linear.default) == ops(traced.gm).count(torch.ops.aten.linear.default) - 1
    last = [n for n in head.graph.nodes if n.op == "call_module" and QUANTIZER_META in n.meta][-1]
    assert last.meta[QUANTIZER_META].startswith("head.")
    assert not state_of(cut).stop_after_quantizers  # reset after the loop
    out = cut(_batches()[0])  # the model itself still runs whole
    assert out.shape == (2, 7, 50)


def test_forward_step_calling_the_model_twice_runs_whole():
    torch.manual_seed(0)
    base = Head()
    runs = []

    def twice(m, b):
        runs.append(m(b).sum())
        return m(b[:, :3])

    loops = _CalibrationLoops(twice)
    qpass.quantize(copy.deepcopy(base), "FP8_DEFAULT_CFG", loops.over(_batches()))
    assert loops.calls_per_batch == 2 and len(runs) == 3 and all(torch.isfinite(r) for r in runs)
