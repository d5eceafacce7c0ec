"""normalize_config: list form, dict form and algorithms read as ModelOpt 0.47 reads them."""

import warnings

import pytest

import qpass.config as qc
from qpass.config import Rule
from qpass.errors import QuantConfigError

W4A8_SEQ = [{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}, {"num_bits": (4, 3), "axis": None}]

# quant_cfg inputs in every shape ModelOpt 0.47 accepts.
QUANT_CFGS = {
    "inner_enable_ignored": [{"quantizer_name": "*", "cfg": {"num_bits": 8, "enable": False}}],
    "empty_cfg_disabled": [{"quantizer_name": "*", "cfg": {}, "enable": False}],
    "explicit_cfg_none": [{"quantizer_name": "*", "cfg": None}],
    "list_to_tuple": [{"quantizer_name": "*", "cfg": {"num_bits": [4, 3], "axis": [0, 1]}}],
    "parent_class_entry": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": {"num_bits": 6}},
    ],
    "sequence": [{"quantizer_name": "*weight_quantizer", "cfg": W4A8_SEQ, "enable": False}],
    "legacy_list": [
        {"*weight_quantizer": {"num_bits": 4, "enable": False}},
        {"nn.Linear": {"*input_quantizer": {"enable": False}, "*weight_quantizer": {"num_bits": 8}}},
    ],
    "legacy_multikey_with_class": [
        {"nn.Conv2d": {"*weight_quantizer": {"num_bits": 8, "axis": 0}}, "*lm_head*": {"enable": False}}
    ],
    "dict_form": {
        "default": {"num_bits": 8, "axis": None},
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}},
        "*lm_head*": {"enable": False},
        "nn.Linear": {"*input_quantizer": {"enable": False}},
        "*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None},
    },
    "dict_form_default_last": {"*weight_quantizer": {"num_bits": 4}, "default": {"enable": False}},
    "dict_form_sequence": {"*weight_quantizer": W4A8_SEQ, "*input_quantizer": {"num_bits": (4, 3)}},
    "dict_form_empty_value": {"*": {}},
    "dict_form_enable_true_only": {"*weight_quantizer": {"enable": True}},
    **{f"preset_{n}": getattr(qc, n)["quant_cfg"] for n in ("INT8_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_KV_ROTATE_CFG")},
}


def _modelopt_entries(quant_cfg):
    from modelopt.torch.quantization.config import normalize_quant_cfg_list

    def cfg_of(c):
        if c is None:
            return None
        if isinstance(c, list):
            return [cfg_of(x) for x in c]
        d = c.model_dump(exclude_unset=True)
        d.pop("enable", None)
        return d

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        entries = normalize_quant_cfg_list(quant_cfg)
    return [(e.quantizer_name, e.parent_class, cfg_of(e.cfg), e.enable) for e in entries]


@pytest.mark.modelopt
@pytest.mark.parametrize("name", sorted(QUANT_CFGS))
def test_rules_match_modelopt_normalization(name):
    pytest.importorskip("modelopt.torch.quantization")
    quant_cfg = QUANT_CFGS[name]
    rules = qc.normalize_quant_cfg(quant_cfg)
    ours = [(r.pattern, r.parent_class, r.cfg, r.enable) for r in rules]
    assert ours == _modelopt_entries(quant_cfg)


def test_dict_form_reads_in_key_order_with_default_as_star():
    rules = qc.normalize_quant_cfg(QUANT_CFGS["dict_form_default_last"])
    assert [r.pattern for r in rules] == ["*weight_quantizer", "*"]
    assert rules[1].cfg is None and rules[1].enable is False


def test_filter_function_keys_and_rule_objects():
    def is_fc1(name):
        return "fc1" in name

    rules = qc.normalize_quant_cfg({is_fc1: {"num_bits": 4, "enable": True}, "*lm_head*": {"enable": False}})
    assert rules[0].pattern is is_fc1 and rules[0].cfg == {"num_bits": 4} and rules[0].enable is True
    rules = qc.normalize_quant_cfg([{"quantizer_name": is_fc1, "enable": False}, Rule("*", cfg={"num_bits": 8})])
    assert rules[0].pattern is is_fc1 and rules[1].enable is True


def test_rule_to_entry_round_trip():
    rules = qc.normalize_quant_cfg(qc.W4A8_AWQ_BETA_CFG["quant_cfg"])
    again = qc.normalize_quant_cfg([r.to_entry() for r in rules])
    assert again == rules


def test_missing_quant_cfg_is_modelopt_default_and_missing_algorithm_is_none():
    rules, algorithm = qc.normalize_config({})
    assert rules == [Rule("*", None, {"num_bits": 8, "axis": None}, True)]
    assert algorithm is None
    assert qc.normalize_config({"quant_cfg": [], "algorithm": "max"}) == ([], {"method": "max"})


# (bad quant_cfg, words the message must contain)
BAD_QUANT_CFGS = [
    ([{"quantizer_name": "*"}], ["quant_cfg[0]", "'cfg', 'enable'"]),
    ([{"quantizer_name": "*", "cfg": {}}], ["quant_cfg[0]", "empty"]),
    ([{"quantizer_name": "*", "cfg": {"enable": True}}], ["quant_cfg[0]", "{'enable': True}"]),
    ([{"quantizer_name": "*", "enable": False}, {"quantizer_name": "*", "cfg": {"num_bits": 8}, "foo": 1}],
     ["quant_cfg[1]", "'foo'", "quantizer_name, parent_class, cfg, enable"]),
    ([{"*weight_quantizer": {"num_bits": 8}, "*input_quantizer": {"num_bits": 8}}], ["quant_cfg[0]", "not a quant_cfg entry"]),
    ("*", ["quant_cfg", "must be a list"]),
    ({"nn.Linear": 8}, ["quant_cfg['nn.Linear']", "needs a dict"]),
    ([{"quantizer_name": "*", "enable": False}, {"quantizer_name": "*weight_quantizer", "cfg": {"num_bit": 8}}],
     ["quant_cfg[1]", "'*weight_quantizer'", "unknown quantizer attribute 'num_bit'", "num_bits"]),
    ({"*weight_quantizer": {"num_bits": (3, 3)}}, ["quant_cfg['*weight_quantizer']", "'num_bits'", "(3, 3)"]),
    ({"*weight_quantizer": {"num_bits": 4, "axis": 0, "block_sizes": {-1: 32}}}, ["'*weight_quantizer'", "'axis'", "'block_sizes'"]),
    ([{"quantizer_name": "*w", "cfg": [{"num_bits": 4}, {"num_bits": (9, 9)}]}], ["quant_cfg[0]['cfg'][1]", "(9, 9)"]),
    ([{"quantizer_name": 3, "enable": False}], ["quant_cfg[0]", "'quantizer_name'"]),
]


@pytest.mark.parametrize("quant_cfg,words", BAD_QUANT_CFGS)
def test_bad_quant_cfg_is_explained(quant_cfg, words):
    with pytest.raises(QuantConfigError) as e:
        qc.normalize_config({"quant_cfg": quant_cfg})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.modelopt
@pytest.mark.parametrize("quant_cfg,words", BAD_QUANT_CFGS)
def test_bad_quant_cfg_is_bad_in_modelopt_too(quant_cfg, words):
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(Exception):
        _modelopt_entries(quant_cfg)


def test_stricter_than_modelopt_entries():
    # ModelOpt reads "no" as False and finds an unknown class only when applying the config.
    with pytest.raises(QuantConfigError, match="'enable' must be True or False"):
        qc.normalize_quant_cfg([{"quantizer_name": "*", "enable": "no"}])
    with pytest.raises(QuantConfigError, match="'nn.Linearr' is not a torch.nn class"):
        qc.normalize_quant_cfg([{"quantizer_name": "*", "parent_class": "nn.Linearr", "enable": False}])


def test_bad_config_shapes():
    with pytest.raises(QuantConfigError, match="unknown key.*'quant_config'.*quant_cfg, algorithm"):
        qc.normalize_config({"quant_config": []})
    with pytest.raises(QuantConfigError, match="preset name or a dict"):
        qc.normalize_config(42)


# ---------------------------------------------------------------------------------- algorithms


@pytest.mark.parametrize(
    "algorithm,expected",
    [
        ("max", {"method": "max"}),
        (None, None),
        ({"method": None}, None),
        ({"method": "awq_lite", "alpha_step": 0.1}, {"method": "awq_lite", "alpha_step": 0.1}),
        ({"method": "smoothquant", "alpha": 0.5}, {"method": "smoothquant", "alpha": 0.5}),
        ({"method": "mse", "fp8_scale_sweep": True, "layerwise": {"enable": True}},
         {"method": "mse", "fp8_scale_sweep": True, "layerwise": {"enable": True}}),
        (["max", {"method": "gptq", "perc_damp": 0.01}], [{"method": "max"}, {"method": "gptq", "perc_damp": 0.01}]),
    ],
)
def test_algorithm_normalization(algorithm, expected):
    assert qc.normalize_config({"quant_cfg": [], "algorithm": algorithm})[1] == expected


def test_every_preset_algorithm_normalizes_to_its_method():
    for name in qc.choices:
        algo = qc.normalize_config(name)[1]
        raw = getattr(qc, name).get("algorithm")
        if raw is None:
            assert algo is None
        else:
            assert algo["method"] == (raw if isinstance(raw, str) else raw["method"])


@pytest.mark.parametrize(
    "algorithm,words",
    [
        ("awq", ["algorithm", "'awq'", "awq_lite", "awq_full", "smoothquant", "gptq", "None"]),
        ("maxx", ["'maxx'", "did you mean 'max'"]),
        ({"method": "real_quantise"}, ["algorithm['method']", "'real_quantise'", "real_quantize"]),
        ({"method": "real_quantize", "additional_algorithm": "real_quantize"}, ["cannot itself be real_quantize"]),
        ({"method": "gptq", "perc_damp": 0}, ["perc_damp", "(0, 1]"]),
        ({"method": "awq_lite", "alpha": 0.5}, ["'alpha'", "awq_lite", "alpha_step"]),
        ({"alpha": 0.5}, ["'method'"]),
        (42, ["algorithm", "method name"]),
        (["max", ["mse"]], ["algorithm[1]", "nested"]),
    ],
)
def test_bad_algorithm_is_explained(algorithm, words):
    with pytest.raises(QuantConfigError) as e:
        qc.normalize_config({"quant_cfg": [], "algorithm": algorithm})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.modelopt
def test_algorithm_names_and_options_match_modelopt():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.mode import CalibrateModeRegistry

    theirs = {}
    for mode in CalibrateModeRegistry._name2descriptor:
        if mode == "_no_calibrate":
            continue
        fields = set(CalibrateModeRegistry[mode].config_class.model_fields) - {"method"}
        theirs[mode.removesuffix("_calibrate")] = fields
    ours = {m: (set(opts) - set(qc.QPASS_OPTIONS.get(m, ()))) | {"moe_calib_experts_ratio", "layerwise"}
            for m, opts in qc.ALGORITHM_OPTIONS.items()}
    assert ours == theirs
    assert not any(set(extra) & theirs[m] for m, extra in qc.QPASS_OPTIONS.items())  # truly qpass's own
