"""QuantizerAttributes: ModelOpt's fields and defaults, validation with useful messages, round trips."""

import json

import pytest

from qpass.config import QuantizerAttributes as QA
from qpass.errors import QuantConfigError

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def test_defaults():
    a = QA()
    assert a.enable is True and a.num_bits == 8 and a.axis is None and a.block_sizes is None
    assert a.type == "static" and a.calibrator == "max" and a.trt_high_precision_dtype == "Float"
    assert a.fake_quant and a.pass_through_bwd and not a.unsigned and not a.narrow_range
    assert QA.from_dict({}) == a


@pytest.mark.modelopt
def test_fields_and_defaults_match_modelopt():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    assert list(QA.field_names()) == list(QuantizerAttributeConfig.model_fields)
    assert QA().to_dict() == QuantizerAttributeConfig().model_dump()


# Attribute dicts both libraries accept, and what ModelOpt makes of them.
VALID = [
    {"num_bits": 8, "axis": 0},
    {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},
    {"num_bits": [4, 3], "axis": None},
    {"num_bits": (4, 3), "axis": [0, 1]},
    {"num_bits": (4, 3), "axis": None, "type": "dynamic", "block_sizes": {-1: None}},
    {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}},
    {"num_bits": (3, 2), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
    {"num_bits": (5, 2), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": [8, 0]}},
    {**NVFP4, "effective_bits": 4.5},
    {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3), "four_over_six": 1}},
    {"num_bits": 16},
    {"num_bits": "custom_fmt", "backend": "my_backend", "backend_extra_args": {"x": 1}},
    {"num_bits": 8, "bias": {-2: None, -4: None, "type": "static"}},
    {"num_bits": 8, "bias": {-1: None, "method": "max_min"}},
    {"num_bits": 8, "calibrator": "histogram", "unsigned": True, "narrow_range": True},
    {"num_bits": 8, "rotate": True},
    {"num_bits": 8, "rotate": {"enable": True, "mode": "rotate_back", "block_size": 64}},
    {"num_bits": 8, "trt_high_precision_dtype": "Half", "fake_quant": False, "pass_through_bwd": False},
    {"num_bits": 8, "constant_amax": 2688.0},
    {"num_bits": (4, 3), "use_constant_amax": True},
]


@pytest.mark.parametrize("d", VALID)
def test_valid_attributes_round_trip_through_json(d):
    a = QA.from_dict(d, key="*weight_quantizer")
    assert QA.from_dict(a.to_dict()) == a
    assert QA.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert isinstance(a.num_bits, (int, tuple, str))


@pytest.mark.modelopt
@pytest.mark.parametrize("d", VALID)
def test_valid_attributes_agree_with_modelopt(d):
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    theirs = QuantizerAttributeConfig(**d).model_dump()
    ours = QA.from_dict(d).to_dict()
    if isinstance(theirs["rotate"], dict):
        theirs["rotate"] = dict(theirs["rotate"])
    assert ours == theirs


# (attributes, words the message must contain). ModelOpt rejects every one of these too.
INVALID = [
    ({"num_bit": 8}, ["unknown quantizer attribute 'num_bit'", "num_bits", "block_sizes", "calibrator"]),
    ({"num_bits": (3, 3)}, ["'num_bits'", "(3, 3)", "(4, 3)", "(2, 1)", "dynamic block"]),
    ({"num_bits": (3, 2)}, ["'num_bits'", "(3, 2)", "only supported with dynamic block"]),
    ({"num_bits": (3, 2), "block_sizes": {-1: 32, "type": "static"}}, ["'num_bits'", "dynamic block"]),
    ({"num_bits": (0, 3), "block_sizes": {-1: 32, "type": "dynamic"}}, ["'num_bits'", "(0, 3)"]),
    ({"num_bits": 0}, ["'num_bits'", "positive int"]),
    ({"num_bits": (4, 3, 1)}, ["'num_bits'"]),
    ({"num_bits": 8, "axis": 0, "block_sizes": {-1: 16}}, ["'block_sizes'", "'axis'", "axis=0"]),
    ({"num_bits": 4, "block_sizes": {-1: 16, "bogus": 1}}, ["'block_sizes'", "'bogus'", "scale_bits", "type"]),
    ({"num_bits": 4, "block_sizes": {-1: 16, -2: 16, "type": "dynamic"}}, ["'block_sizes'", "exactly one"]),
    ({"num_bits": 4, "block_sizes": {-1: 16.5}}, ["'block_sizes'", "positive int"]),
    ({"num_bits": 8, "calibrator": "minmax"}, ["'calibrator'", "'max'", "'histogram'", "'minmax'"]),
    ({"num_bits": 8, "type": "semi"}, ["'type'", "'static'", "'dynamic'"]),
    ({"num_bits": 8, "trt_high_precision_dtype": "Double"}, ["'trt_high_precision_dtype'", "BFloat16"]),
    ({"num_bits": 8, "effective_bits": 20}, ["'effective_bits'", "(0, 16]"]),
    ({"num_bits": 8, "bias": {"type": "static"}}, ["'bias'", "axis"]),
    ({"num_bits": 8, "bias": {-1: None, "method": "median"}}, ["'bias'", "'mean'", "'max_min'"]),
    ({"num_bits": 8, "constant_amax": -1.0}, ["'constant_amax'", "positive"]),
    ({"num_bits": 8, "constant_amax": 1.0, "use_constant_amax": True}, ["'constant_amax'", "use_constant_amax"]),
    ({"num_bits": 8, "learn_amax": True}, ["'learn_amax'"]),
    ({"num_bits": 8, "rotate": {"enable": True, "mode": "spin"}}, ["'rotate'", "rotate_back"]),
    ({"num_bits": 8, "rotate": {"block_size": 0}}, ["'rotate'", "block_size"]),
]


@pytest.mark.parametrize("d,words", INVALID)
def test_invalid_attributes_are_explained(d, words):
    with pytest.raises(QuantConfigError) as e:
        QA.from_dict(d, key="*weight_quantizer")
    msg = str(e.value)
    assert msg.startswith("*weight_quantizer: "), msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.modelopt
@pytest.mark.parametrize("d,words", INVALID)
def test_invalid_attributes_are_invalid_in_modelopt_too(d, words):
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        QuantizerAttributeConfig(**d)


# qpass is stricter than ModelOpt here: ModelOpt accepts these and fails later, or silently misreads.
STRICTER = [
    {"num_bits": "nvfp4"},  # a format string without a custom backend
    {"num_bits": True},  # pydantic reads True as 1 bit
    {"num_bits": 4, "block_sizes": {-1: 16, "type": "semi"}},
    {"num_bits": 8, "enable": "yes"},
]


@pytest.mark.parametrize("d", STRICTER)
def test_stricter_than_modelopt(d):
    with pytest.raises(QuantConfigError):
        QA.from_dict(d, key="k")


def test_wrong_container_type():
    with pytest.raises(QuantConfigError, match="must be a dict"):
        QA.from_dict([("num_bits", 8)], key="*input_quantizer")


def test_direct_construction_validates_and_normalizes():
    with pytest.raises(QuantConfigError, match="num_bits"):
        QA(num_bits=(3, 3))
    assert QA(num_bits=[4, 3], axis=[0]).num_bits == (4, 3)
    assert QA(num_bits=4, block_sizes={"-1": 16}).block_sizes == {-1: 16}


def test_to_dict_exclude_defaults_and_replace():
    a = QA.from_dict(NVFP4)
    assert a.to_dict(exclude_defaults=True) == NVFP4
    assert a.is_dynamic_block
    b = a.replace(enable=False)
    assert b.enable is False and a.enable is True
    with pytest.raises(QuantConfigError):
        a.replace(axis=0)


def test_callable_calibrator_is_kept():
    class MyCalib:
        pass

    assert QA.from_dict({"calibrator": MyCalib}).calibrator is MyCalib
    assert QA.from_dict({"calibrator": (MyCalib, (8,), {})}).calibrator[0] is MyCalib
