"""Calibrating a SmoothQuant/AWQ model again starts from the unsmoothed weights: the scales never stack."""

import copy

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import CalibrationError
from qpass.graph.quantized_model import state_of

INT8 = [{"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}}]
INT4 = [{"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}}]


class NormTwoLinear(nn.Module):
    """A norm folded into (fc1), then an explicit pre_quant_scale (fc2 reads a placeholder-like relu)."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def _case():
    torch.manual_seed(0)
    model = NormTwoLinear().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16, 32)
    x[..., 3] *= 20.0
    return model, x


def _state(model):
    values = {k: v.clone() for k, v in model.state_dict().items()}
    values.update({f"{n}.pqs": q.pre_quant_scale.clone() for n, q in model.named_modules()
                   if n.endswith("input_quantizer") and q.pre_quant_scale is not None})
    return values


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("quant_cfg,algorithm", [
    (INT8, {"method": "smoothquant", "alpha": 0.5}),
    (INT8, {"method": "smoothquant", "alpha": "auto"}),
    (INT4, {"method": "awq_lite", "alpha_step": 0.25}),
    (INT4, {"method": "awq_full", "alpha_step": 0.25}),
])
def test_second_calibration_gives_the_identical_model(quant_cfg, algorithm):
    model, x = _case()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    qpass.quantize(model, {"quant_cfg": quant_cfg, "algorithm": algorithm}, lambda m: m(x))
    once = _state(model)
    assert not torch.equal(model.fc1.weight, w0["fc1.weight"])  # it did smooth
    assert state_of(model).smoothing
    qpass.calibrate(model, algorithm, lambda m: m(x))
    _assert_same(_state(model), once)
    qpass.calibrate(model, algorithm, lambda m: m(x))
    _assert_same(_state(model), once)


def test_recalibration_with_another_alpha_starts_from_the_original_weights():
    model, x = _case()
    fresh = copy.deepcopy(model)
    qpass.quantize(model, {"quant_cfg": INT8, "algorithm": {"method": "smoothquant", "alpha": 0.9}}, lambda m: m(x))
    qpass.calibrate(model, {"method": "smoothquant", "alpha": 0.3}, lambda m: m(x))
    qpass.quantize(fresh, {"quant_cfg": INT8, "algorithm": {"method": "smoothquant", "alpha": 0.3}}, lambda m: m(x))
    _assert_same(_state(model), _state(fresh))


def test_failed_recalibration_keeps_the_previous_smoothing(monkeypatch):
    import qpass.algorithms.smoothing as smoothing

    model, x = _case()
    qpass.quantize(model, {"quant_cfg": INT8, "algorithm": {"method": "smoothquant", "alpha": 0.5}}, lambda m: m(x))
    before = _state(model)

    def boom(_model, _groups=()):
        raise RuntimeError("weights could not be calibrated")

    monkeypatch.setattr(smoothing, "calibrate_weights", boom)
    with pytest.raises(RuntimeError, match="calibrated"):
        qpass.calibrate(model, {"method": "smoothquant", "alpha": 0.2}, lambda m: m(x))
    _assert_same(_state(model), before)
    monkeypatch.undo()
    qpass.calibrate(model, {"method": "smoothquant", "alpha": 0.5}, lambda m: m(x))  # still undoable
    _assert_same(_state(model), before)


def test_weights_changed_after_smoothing_are_refused_by_name():
    model, x = _case()
    qpass.quantize(model, {"quant_cfg": INT8, "algorithm": {"method": "smoothquant", "alpha": 0.5}}, lambda m: m(x))
    with torch.no_grad():
        model.fc2.weight.mul_(2.0)
    before = _state(model)
    with pytest.raises(CalibrationError, match="fc2.weight"):
        qpass.calibrate(model, {"method": "smoothquant", "alpha": 0.5}, lambda m: m(x))
    _assert_same(_state(model), before)
