"""qpass.debug.compare (per-quantizer SQNR and layer-output error) and the JSON summary."""

import copy
import json
import math

import pytest
import torch

import qpass
from qpass import debug
from qpass.summary import quantizer_rows, summary_json, write_json

from conftest import MLP, needs_minilm, tiny_llama


def _loop(batches):
    return lambda m: [m(b) for b in batches]


def test_compare_mlp_reports_every_enabled_quantizer_worst_first(tmp_path):
    torch.manual_seed(0)
    fp = MLP().eval()
    q = copy.deepcopy(fp)
    batches = [torch.randn(4, 32) for _ in range(2)]
    qpass.quantize(q, "INT8_DEFAULT_CFG", _loop(batches))
    res = debug.compare(fp, q, _loop(batches), png=str(tmp_path / "c.png"))
    assert {r.name for r in res} == {"fc1.input_quantizer", "fc1.weight_quantizer",
                                     "fc2.input_quantizer", "fc2.weight_quantizer"}
    assert [r.sqnr_db for r in res] == sorted(r.sqnr_db for r in res)
    for r in res:
        assert 20 < r.sqnr_db < 60 and 0 < r.layer_error < 0.1 and r.reference == "fp_model"
    # fc2's output error carries fc1's: larger than fc1's
    err = {r.name: r.layer_error for r in res}
    assert err["fc2.input_quantizer"] > err["fc1.input_quantizer"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "fc1.input_quantizer" in debug.format_compare(res)


def test_compare_identity_when_quantizers_are_disabled():
    torch.manual_seed(0)
    fp = MLP().eval()
    q = copy.deepcopy(fp)
    x = [torch.randn(3, 32)]
    qpass.quantize(q, "INT8_DEFAULT_CFG", _loop(x))
    qpass.disable_quantizer(q, "*weight_quantizer")
    res = debug.compare(fp, q, _loop(x))
    assert {r.slot for r in res} == {"input_quantizer"}
    assert res[0].layer_error > 0


def test_compare_llama_attention_slots_use_the_graph_reference():
    fp = tiny_llama(tie=True)
    q = copy.deepcopy(fp)
    ids = [torch.randint(0, 128, (2, 7))]
    cfg = copy.deepcopy(qpass.FP8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}})
    qpass.quantize(q, cfg, lambda m: [m(input_ids=i) for i in ids])
    res = debug.compare(fp, q, lambda m: [m(input_ids=i) for i in ids])
    names = {r.name for r in res}
    assert "model.layers.0.self_attn.k_bmm_quantizer" in names
    assert all(math.isfinite(r.layer_error) for r in res)
    bmm = next(r for r in res if r.name.endswith("k_bmm_quantizer"))
    assert bmm.reference == "graph"  # an op inside the attention module, not a leaf module


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_compare_module_called_twice_uses_the_graph_reference():
    torch.manual_seed(0)
    fp = _Twice().eval()
    q = copy.deepcopy(fp)
    xs = [torch.randn(4, 16)]
    qpass.quantize(q, "INT8_DEFAULT_CFG", _loop(xs))
    res = {r.name: r for r in debug.compare(fp, q, _loop(xs))}
    assert res["fc.input_quantizer"].reference == "graph"
    assert 0 < res["fc.input_quantizer"].layer_error < 0.1


def test_compare_refuses_swapped_models(mlp):
    q = copy.deepcopy(mlp)
    qpass.quantize(q, "INT8_DEFAULT_CFG", _loop([torch.randn(2, 32)]))
    with pytest.raises(qpass.QpassError, match="not quantized"):
        debug.compare(q, mlp, _loop([torch.randn(2, 32)]))
    with pytest.raises(qpass.QpassError, match="never called"):
        debug.compare(mlp, q, lambda m: None)


def test_plot_without_matplotlib_skips_with_a_message(monkeypatch, capsys, tmp_path):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert debug.plot_compare([], str(tmp_path / "x.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_summary_json_has_the_same_rows(mlp, tmp_path):
    qpass.quantize(mlp, "INT8_DEFAULT_CFG", _loop([torch.randn(2, 32)]))
    doc = json.loads(summary_json(mlp))
    assert doc["quantizers"] == json.loads(json.dumps(quantizer_rows(mlp)))
    assert (doc["total"], doc["enabled"], doc["with_amax"]) == (6, 4, 4)
    p = write_json(mlp, tmp_path / "s.json")
    assert json.loads(open(p).read()) == doc


@needs_minilm
@pytest.mark.real_model
@pytest.mark.slow
def test_minilm_int8_modelopt_rules_worst_are_layernorm_inputs():
    """ModelOpt's INT8 enables input quantizers on LayerNorm; compare() shows they are the worst."""
    from qpass import zoo

    model, tok = zoo.load_minilm()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(zoo.text_split().calib, 16))
    fp = copy.deepcopy(model)
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: [m(**b) for b in calib], rules="modelopt")
    res = debug.compare(fp, model, lambda m: [m(**b) for b in calib[:1]])
    worst = [r.name for r in res[:3]]
    assert all("LayerNorm.input_quantizer" in n for n in worst), worst
    ln = [r for r in res if "LayerNorm" in r.name]
    assert max(r.layer_error for r in ln) > 0.5  # their output is mostly noise
