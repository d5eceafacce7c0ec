"""real_quantize: packed weights, FP32 storage released, outputs bit-identical to fake quant."""

import copy
import warnings

import pytest
import torch

import qpass
from qpass.errors import QpassError, QuantConfigError
from qpass.formats import QuantSpec
from qpass.formats import packed as packing
from qpass.graph.quantized_model import state_of
from qpass.nn.packed_weight import PackedWeightQuantizer, is_placeholder

from conftest import MLP, needs_smollm2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ["INT8_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
           "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG", "MXFP4_DEFAULT_CFG", "MXFP8_DEFAULT_CFG"]


def _real(name, inner="<preset>"):
    cfg = copy.deepcopy(getattr(qpass, name))
    algo = {"method": "real_quantize"}
    inner = cfg.get("algorithm") if inner == "<preset>" else inner
    if inner is not None:
        algo["additional_algorithm"] = inner
    cfg["algorithm"] = algo
    return cfg


@pytest.mark.parametrize("attrs", [
    dict(num_bits=8, axis=0), dict(num_bits=4, block_sizes={-1: 16}), dict(num_bits=(4, 3)),
    dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}),
    dict(num_bits=(2, 1), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}),
    dict(num_bits=4, block_sizes={-1: 16}, unsigned=True),
])
def test_pack_unpack_equals_fake_quant(attrs):
    torch.manual_seed(0)
    w = torch.randn(24, 40) * 3
    spec = QuantSpec.from_attributes(**attrs)
    amax = spec.amax_of(w) if spec.needs_amax else None
    p = packing.pack(spec, w, amax)
    assert torch.equal(packing.unpack(spec, p, amax, w.shape, w.dtype), spec.fake_quant(w, amax))
    if spec.num_bits == 4 or spec.num_bits == (2, 1):
        assert p["codes"].dtype == torch.uint8 and p["codes"].numel() == w.numel() // 2


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_llama_packed_is_bit_identical_and_smaller(name):
    base = tiny_llama(2, tie=True)
    ids = torch.randint(0, 128, (2, 16))
    fake, packed = copy.deepcopy(base), copy.deepcopy(base)
    qpass.quantize(fake, name, lambda m: m(input_ids=ids))
    qpass.quantize(packed, _real(name), lambda m: m(input_ids=ids))
    assert torch.equal(fake(input_ids=ids).logits, packed(input_ids=ids).logits)
    # a new input structure traces again through the placeholder weights
    mask = torch.ones_like(ids[:, :9])
    assert torch.equal(fake(input_ids=ids[:, :9], attention_mask=mask).logits,
                       packed(input_ids=ids[:, :9], attention_mask=mask).logits)
    lin = packed.model.layers[1].mlp.down_proj
    assert isinstance(lin.weight_quantizer, PackedWeightQuantizer)
    assert is_placeholder(lin.weight) and lin.weight.untyped_storage().nbytes() == lin.weight.element_size()
    before, after = state_of(packed).packed_bytes
    assert after < (0.3 if "8" in name else 0.16) * before
    for traced in state_of(packed).graphs.values():  # the graphs hold no FP32 weight any more
        for t in traced:
            assert is_placeholder(t.gm.get_submodule("model.layers.1.mlp").down_proj.weight)


def test_int4_packed_bytes_are_a_quarter_byte_and_a_scale_per_block():
    torch.manual_seed(0)
    model = MLP(d=256, h=512).eval()
    x = torch.randn(4, 256)
    qpass.quantize(model, _real("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), lambda m: m(x))
    q = model.fc1.weight_quantizer
    assert set(q.packed) == {"codes"} and q.packed["codes"].shape == (512, 128)
    assert q.packed_bytes == 512 * 128 + 512 * 2 * 4  # nibbles + one FP32 amax per block of 128
    before, after = state_of(model).packed_bytes
    assert after / before == pytest.approx((0.5 + 4 / 128) / 4)


def test_tied_weight_stays_unpacked_and_the_embedding_keeps_working():
    base = tiny_llama(2, tie=True)
    ids = torch.randint(0, 128, (2, 16))
    cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}}, "algorithm": "max"}
    fake, packed = copy.deepcopy(base), copy.deepcopy(base)
    qpass.quantize(fake, cfg, lambda m: m(input_ids=ids))
    with pytest.warns(UserWarning, match="lm_head are shared with another module; they stay unpacked"):
        qpass.quantize(packed, {**cfg, "algorithm": {"method": "real_quantize"}}, lambda m: m(input_ids=ids))
    assert not isinstance(packed.lm_head.weight_quantizer, PackedWeightQuantizer)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    assert torch.equal(packed.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(fake(input_ids=ids).logits, packed(input_ids=ids).logits)


@pytest.mark.parametrize("inner", [{"method": "gptq", "block_size": 64}, "awq_lite", None])
def test_additional_algorithm_runs_first(inner):
    base = tiny_llama(2)
    ids = torch.randint(0, 128, (2, 16))
    cfg = copy.deepcopy(qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    fake, packed = copy.deepcopy(base), copy.deepcopy(base)
    qpass.quantize(fake, {**cfg, "algorithm": inner}, lambda m: m(input_ids=ids))
    qpass.quantize(packed, _real("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", inner), lambda m: m(input_ids=ids))
    assert torch.equal(fake(input_ids=ids).logits, packed(input_ids=ids).logits)
    assert isinstance(packed.model.layers[0].self_attn.q_proj.weight_quantizer, PackedWeightQuantizer)


def test_default_additional_algorithm_is_max(mlp):
    x = torch.randn(4, 32)
    fake, packed = copy.deepcopy(mlp), copy.deepcopy(mlp)
    qpass.quantize(fake, qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    qpass.quantize(packed, {**qpass.INT8_DEFAULT_CFG, "algorithm": {"method": "real_quantize"}}, lambda m: m(x))
    assert torch.equal(fake(x), packed(x))
    assert packed.fc1.input_quantizer.amax is not None


@pytest.mark.parametrize("algorithm,words", [
    ({"method": "real_quantize", "additional_algorithm": ["max"]}, ["additional_algorithm", "not a list"]),
    ({"method": "real_quantize", "additional_algorithm": {"method": "real_quantize"}}, ["cannot itself"]),
    ({"method": "real_quantize", "additional_algorithm": "maxx"}, ["'maxx'", "did you mean 'max'"]),
    ({"method": "real_quantize", "alpha": 1}, ["'alpha'", "additional_algorithm"]),
])
def test_bad_real_quantize_config_is_explained(mlp, algorithm, words):
    with pytest.raises(QuantConfigError) as e:
        qpass.quantize(mlp, {"quant_cfg": {"*weight_quantizer": {"num_bits": 8}}, "algorithm": algorithm})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_quantizer_sequence_is_refused_before_any_work(mlp):
    x = torch.randn(4, 32)
    ref = mlp(x)
    with pytest.raises(QuantConfigError, match=r"'fc1.weight_quantizer' is a sequence .* not implemented"):
        qpass.quantize(mlp, _real("W4A8_AWQ_BETA_CFG"), lambda m: m(x))
    assert type(mlp) is MLP and torch.equal(mlp(x), ref) and not is_placeholder(mlp.fc1.weight)


def test_packed_quantizer_cannot_be_disabled_or_recalibrated(mlp):
    x = torch.randn(4, 32)
    qpass.quantize(mlp, _real("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), lambda m: m(x))
    out = mlp(x)
    with pytest.raises(QpassError, match="holds its weight packed"):
        qpass.disable_quantizer(mlp, "*fc1.weight_quantizer")
    qpass.calibrate(mlp, "max", lambda m: m(x))  # weights are not re-read from the placeholder
    assert torch.equal(mlp(x), out)


@pytest.mark.parametrize("name", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_fold_weight_of_a_packed_model_restores_the_dequantized_weights(mlp, name):
    x = torch.randn(4, 32)
    qpass.quantize(mlp, _real(name), lambda m: m(x))
    out = mlp(x)
    want = mlp.fc1.weight_quantizer.dequantized()
    qpass.fold_weight(mlp)
    assert torch.equal(mlp(x), out)
    assert isinstance(mlp.fc1.weight, torch.nn.Parameter) and torch.equal(mlp.fc1.weight, want)
    assert not is_placeholder(mlp.fc1.weight) and "fc1.weight" in mlp.state_dict()
    assert type(mlp.fc1.weight_quantizer) is not PackedWeightQuantizer and not mlp.fc1.weight_quantizer.is_enabled
    assert "fc1.weight_quantizer._codes" not in mlp.state_dict()


def test_state_dict_round_trip_of_a_packed_model(mlp):
    x = torch.randn(4, 32)
    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    for m in (a, b):
        qpass.quantize(m, _real("NVFP4_DEFAULT_CFG"), lambda mm: mm(x))
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    b.fc1.weight_quantizer._buffers["_codes"].zero_()
    b.load_state_dict(sd)
    assert torch.equal(a(x), b(x))


@pytest.mark.real_model
@needs_smollm2
@pytest.mark.parametrize("name", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "NVFP4_DEFAULT_CFG"])
def test_smollm2_two_layers_packed_is_bit_identical(name):
    from qpass import zoo

    base, tok = zoo.load_smollm2(2)
    ids = zoo.token_windows(tok, zoo.text_split().calib, 2, 64)
    fake, packed = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(fake, name, lambda m: m(input_ids=ids))
        qpass.quantize(packed, _real(name), lambda m: m(input_ids=ids))
    with torch.no_grad():
        assert torch.equal(fake(input_ids=ids).logits, packed(input_ids=ids).logits)
    before, after = state_of(packed).packed_bytes
    assert after / before <= 0.141


@pytest.mark.parametrize("inner", ["max", {"method": "gptq", "block_size": 64}])
def test_save_restore_of_a_packed_model(tmp_path, inner):
    base = tiny_llama(2)
    ids = torch.randint(0, 128, (2, 16))
    packed, fresh = copy.deepcopy(base), copy.deepcopy(base)
    qpass.quantize(packed, _real("NVFP4_DEFAULT_CFG", inner), lambda m: m(input_ids=ids))
    out = packed(input_ids=ids).logits
    qpass.save(packed, tmp_path / "m.qpass")
    qpass.restore(fresh, tmp_path / "m.qpass")
    q = fresh.model.layers[0].mlp.up_proj.weight_quantizer
    assert isinstance(q, PackedWeightQuantizer) and is_placeholder(fresh.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(fresh(input_ids=ids).logits, out)
    other = tiny_llama(2)
    with torch.no_grad():
        other.model.norm.weight.mul_(2)
    if inner == "max":  # weights not stored: a model with other weights is refused
        with pytest.raises(QpassError, match="model.norm.weight"):
            qpass.restore(other, tmp_path / "m.qpass")
    else:  # gptq changed the weights: they are stored (packed ones as codes) and loaded
        qpass.restore(other, tmp_path / "m.qpass")
        assert torch.equal(other(input_ids=ids).logits, out)


@pytest.mark.parametrize("name", ["INT8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
def test_lowering_a_packed_model_reads_the_packed_weight(mlp, name):
    from qpass.passes.lower import lower_graph

    x = torch.randn(4, 32)
    fake, packed = copy.deepcopy(mlp), copy.deepcopy(mlp)
    qpass.quantize(fake, name, lambda m: m(x))
    qpass.quantize(packed, _real(name), lambda m: m(x))
    fake(x), packed(x)  # weight-only configs trace on the first call
    outs = [lower_graph(next(iter(state_of(m).graphs.values()))[0].gm)(x) for m in (fake, packed)]
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
