"""The presets: same names and content as ModelOpt 0.47, independent copies, helpful lookup errors."""

import copy

import pytest

import qpass.config as qc
from qpass.errors import QuantConfigError


def _canon(x):
    """Tuples and lists compare alike; callables by name."""
    if isinstance(x, (list, tuple)):
        return [_canon(i) for i in x]
    if isinstance(x, dict):
        return {k: _canon(v) for k, v in x.items()}
    if callable(x):
        return getattr(x, "__qualname__", repr(x))
    return x


def test_there_are_39_presets_and_all_are_attributes():
    assert len(qc.choices) == 39
    for name in qc.choices:
        preset = getattr(qc, name)
        assert set(preset) <= {"quant_cfg", "algorithm"}
        assert isinstance(preset["quant_cfg"], list)


@pytest.mark.modelopt
def test_choices_equal_modelopt():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    assert qc.choices == set(mtq.config.choices)


@pytest.mark.modelopt
@pytest.mark.parametrize("name", sorted(qc.choices))
def test_preset_equals_modelopt(name):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    theirs = getattr(mtq.config, name)
    ours = getattr(qc, name)
    assert _canon(ours) == _canon(theirs)
    # Same rule order, same keys, and tuples where ModelOpt has tuples.
    assert ours == theirs
    assert ("algorithm" in ours) == ("algorithm" in theirs)


def test_get_preset_returns_independent_deep_copy():
    a = qc.get_preset("INT8_DEFAULT_CFG")
    assert a == qc.INT8_DEFAULT_CFG
    a["quant_cfg"][1]["cfg"]["num_bits"] = 4
    a["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": False})
    assert qc.INT8_DEFAULT_CFG["quant_cfg"][1]["cfg"]["num_bits"] == 8
    assert qc.get_preset("INT8_DEFAULT_CFG") == qc.INT8_DEFAULT_CFG


def test_presets_share_no_mutable_objects():
    before = {n: copy.deepcopy(getattr(qc, n)) for n in qc.choices}
    qc.FP8_DEFAULT_CFG["quant_cfg"][1]["cfg"]["axis"] = 0
    qc.FP8_DEFAULT_CFG["quant_cfg"][-1]["enable"] = True
    try:
        for n in qc.choices - {"FP8_DEFAULT_CFG"}:
            assert getattr(qc, n) == before[n], n
    finally:
        qc.FP8_DEFAULT_CFG["quant_cfg"][1]["cfg"]["axis"] = None
        qc.FP8_DEFAULT_CFG["quant_cfg"][-1]["enable"] = False
    assert qc.FP8_DEFAULT_CFG == before["FP8_DEFAULT_CFG"]


def test_unknown_preset_names_choices_and_close_matches():
    with pytest.raises(QuantConfigError) as e:
        qc.get_preset("INT9_CFG")
    msg = str(e.value)
    assert "unknown preset 'INT9_CFG'" in msg
    assert "choices:" in msg and "INT8_DEFAULT_CFG" in msg and "NVFP4_DEFAULT_CFG" in msg
    with pytest.raises(QuantConfigError, match="did you mean.*FP8_DEFAULT_CFG"):
        qc.get_preset("FP8_DEFALT_CFG")
    with pytest.raises(QuantConfigError, match="unknown preset"):
        qc.normalize_config("NOPE")
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", sorted(qc.choices))
def test_every_preset_normalizes(name):
    rules, algorithm = qc.normalize_config(name)
    assert len(rules) == len(getattr(qc, name)["quant_cfg"])
    assert algorithm is None or isinstance(algorithm, dict)
    if "algorithm" not in getattr(qc, name):  # KV-cache presets
        assert algorithm is None


def test_preset_is_exported_from_qpass_top_level():
    import qpass

    assert qpass.INT8_DEFAULT_CFG is qc.INT8_DEFAULT_CFG
