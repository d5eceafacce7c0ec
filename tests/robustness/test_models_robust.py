"""Models that stress the graph path: low-precision dtypes, tied weights, a module called twice,
dynamic shapes, a failing forward_loop, re-calibration, and quantizing twice.
(tests/test_model_quant.py covers the basic cases; these add what it does not.)"""

import copy

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import QpassError, TraceError
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import MLP, tiny_bert, tiny_llama


def _amax(model):
    return {n: q.amax.clone() for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.amax is not None}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["FP8_DEFAULT_CFG", "INT8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_low_precision_model_scales_in_fp32_without_overflow(dtype, config):
    torch.manual_seed(0)
    model = MLP(32, 64).to(dtype).eval()
    with torch.no_grad():
        model.fc1.weight[0, 0] = 60000.0 if dtype == torch.float16 else 3e38  # near the dtype's max
    x = (torch.randn(4, 32) * 1e-3).to(dtype)  # the model itself must not overflow
    qpass.quantize(model, config, lambda m: m(x))
    for name, a in _amax(model).items():
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
    y = model(x)
    assert y.dtype == dtype
    # the huge weight saturates; nothing becomes inf/nan (FP8 overflow)
    assert torch.isfinite(model.fc1.weight_quantizer(model.fc1.weight)).all()


def test_tied_weights_quantize_both_users_and_stay_tied():
    model = tiny_llama(layers=1, tie=True)
    ids = torch.randint(0, 128, (2, 9))
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": True})
    qpass.quantize(model, cfg, lambda m: m(input_ids=ids))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.lm_head.weight_quantizer.amax is not None
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_module_called_twice_calibrates_over_both_calls():
    torch.manual_seed(0)
    model = _Twice().eval()
    x = torch.randn(8, 16) * 3
    second_in = torch.relu(model.fc(x)).detach()
    fp = model(x)
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(x))
    expected = torch.maximum(x.abs().max(), second_in.abs().max())
    torch.testing.assert_close(model.fc.input_quantizer.amax, expected)
    y = model(x)
    assert (y - fp).abs().max() < 0.05 * fp.abs().max()


class _DataDependentLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        for _ in range(int(x.abs().sum().item()) % 3 + 1):  # data-dependent trip count
            x = self.fc(x)
        return x


def test_untraceable_loop_is_a_trace_error_and_model_untouched():
    torch.manual_seed(0)
    model = _DataDependentLoop()
    x = torch.randn(2, 8)
    ref = model(x)
    keys = list(model.state_dict())
    with pytest.raises(TraceError, match="torch.export could not trace the model"):
        qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(x), capture="export")
    assert type(model) is _DataDependentLoop and list(model.state_dict()) == keys
    assert torch.equal(model(x), ref)


def test_dynamic_batch_and_sequence_during_calibration_and_after():
    model = tiny_llama(layers=1, tie=False)
    shapes = [(1, 3), (4, 17), (2, 64), (3, 5)]
    batches = [torch.randint(0, 128, s) for s in shapes]
    ref = copy.deepcopy(model)
    qpass.quantize(model, "FP8_DEFAULT_CFG", lambda m: [m(input_ids=b) for b in batches])
    graphs = qpass.graph.quantized_model.state_of(model).graphs  # noqa: F841 - one key
    for b in [torch.randint(0, 128, (5, 31)), torch.randint(0, 128, (1, 1))]:
        out = model(input_ids=b).logits
        assert out.shape == (*b.shape, 128)
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref(input_ids=b).logits.flatten(), dim=0)
        assert cos > 0.98


def test_forward_loop_raising_inside_quantize_leaves_model_reusable():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32)
    ref = model(x)

    def broken(m):
        m(x)
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        qpass.quantize(model, "INT8_DEFAULT_CFG", broken)
    assert type(model) is MLP and torch.equal(model(x), ref)
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(x))  # the same object quantizes afterwards
    assert model.fc1.input_quantizer.amax is not None


def test_recalibrating_with_other_data_replaces_not_accumulates():
    torch.manual_seed(0)
    model = MLP().eval()
    small, big = torch.randn(4, 32), torch.randn(4, 32) * 10
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(big))
    qpass.calibrate(model, "max", lambda m: m(small))
    torch.testing.assert_close(model.fc1.input_quantizer.amax, small.abs().max())


def test_quantizing_a_quantized_bert_is_a_clear_error_and_keeps_it_working():
    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 7))
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(input_ids=ids))
    before = model(input_ids=ids).last_hidden_state
    amax = _amax(model)
    with pytest.raises(QpassError, match="already quantized"):
        qpass.quantize(model, "FP8_DEFAULT_CFG", lambda m: m(input_ids=ids))
    assert torch.equal(model(input_ids=ids).last_hidden_state, before)
    assert all(torch.equal(a, _amax(model)[n]) for n, a in amax.items())
