"""resolve_attributes against the quantizers ModelOpt actually configures on a small model."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass.config as qc
from qpass.config import QuantizerAttributes as QA
from qpass.config import Rule

D = 32


class MyLinear(nn.Linear):
    """A subclass with the same forward: ModelOpt quantizes it, but parent_class 'nn.Linear' skips it."""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(D, 2 * D), "fc2": MyLinear(2 * D, D)})
        self.router = nn.Linear(D, 2)
        self.experts = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)])

    def forward(self, x):
        h = self.o_proj(self.q_proj(self.norm(x)))
        h = self.mlp["fc2"](F.relu(self.mlp["fc1"](h)))
        w = self.router(h).softmax(-1)
        return x + w[..., :1] * self.experts[0](h) + w[..., 1:] * self.experts[1](h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, D)
        self.conv = nn.Conv2d(3, D, 3)
        self.bn = nn.BatchNorm2d(D)
        self.act = nn.LeakyReLU()
        self.block = Block()
        self.lm_head = nn.Linear(D, 16)

    def forward(self, ids, img):
        x = self.embed(ids)
        v = self.act(self.bn(self.conv(img))).mean((-1, -2))
        return self.lm_head(self.block(x + v[:, None, :]))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 16, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


EXTRA_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer", "p_bmm_quantizer")


def _modelopt_state(q):
    rotate = q._rotate
    if not isinstance(rotate, bool):
        rotate = rotate.model_dump() if hasattr(rotate, "model_dump") else dict(rotate)
    return {
        "enable": q.is_enabled,
        "num_bits": q.num_bits,
        "axis": q.axis,
        "block_sizes": q.block_sizes,
        "type": "dynamic" if q._dynamic else "static",
        "unsigned": q._unsigned,
        "narrow_range": q._narrow_range,
        "fake_quant": q._fake_quant,
        "effective_bits": getattr(q, "_effective_bits", None),
        "bias": getattr(q, "_bias", None),
        "rotate": rotate,
        "use_constant_amax": q._use_constant_amax,
    }


COMPARED = ("enable", "num_bits", "axis", "block_sizes", "type", "unsigned", "narrow_range", "fake_quant",
            "effective_bits", "bias", "rotate", "use_constant_amax")


def _ours(a: QA):
    d = a.to_dict()
    return {k: d[k] for k in COMPARED}


def _compare(model, orig, rules):
    """Every ModelOpt quantizer in ``model`` against qpass's resolution on the original modules."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    checked = 0
    for name, q in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.isdigit() and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), SequentialQuantizer):
            continue  # members of a sequence are compared with the sequence
        if not isinstance(q, (TensorQuantizer, SequentialQuantizer)):
            continue
        parent = orig.get_submodule(name.rpartition(".")[0])
        got = qc.resolve_attributes(rules, name, parent)
        if got is None:
            got = qc.default_attributes(name, parent)
        if isinstance(q, SequentialQuantizer):
            assert isinstance(got, list), name
            assert [_modelopt_state(s) for s in q] == [_ours(a) for a in got], name
        else:
            assert not isinstance(got, list), name
            assert _modelopt_state(q) == _ours(got), name
        checked += 1
    assert checked >= 20
    return checked


def _configured_by_modelopt(quant_cfg, extra=True):
    """A converted, uncalibrated ModelOpt model with ``quant_cfg`` applied (no forward needed)."""
    from modelopt.torch.quantization.conversion import replace_quant_module, set_quantizer_by_cfg
    from modelopt.torch.quantization.nn import TensorQuantizer

    orig = Net()
    model = copy.deepcopy(orig)
    replace_quant_module(model)
    if extra:
        for slot in EXTRA_QUANTIZERS:
            model.block.add_module(slot, TensorQuantizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_quantizer_by_cfg(model, quant_cfg)
    return model, orig


@pytest.fixture(scope="module")
def mtq():
    return pytest.importorskip("modelopt.torch.quantization")


@pytest.mark.modelopt
@pytest.mark.parametrize("name", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_quantize_with_calibration_matches(mtq, name, capsys):
    orig = Net()
    model = copy.deepcopy(orig)
    ids, img = _inputs()
    mtq.quantize(model, getattr(mtq, name), lambda m: m(ids, img))
    rules, _ = qc.normalize_config(name)
    _compare(model, orig, rules)
    assert model.block.q_proj.weight_quantizer.is_enabled
    assert not model.lm_head.weight_quantizer.is_enabled
    assert not model.bn.input_quantizer.is_enabled


@pytest.mark.modelopt
@pytest.mark.parametrize("name", sorted(qc.choices))
def test_every_preset_matches_set_quantizer_by_cfg(mtq, name, capsys):
    model, orig = _configured_by_modelopt(getattr(mtq, name)["quant_cfg"])
    rules, _ = qc.normalize_config(name)
    _compare(model, orig, rules)


# Configs that exercise the precedence corners.
SEQ = [{"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}, {"num_bits": (4, 3), "axis": None}]
CORNER_CFGS = {
    "dict_form": {
        "default": {"num_bits": 8, "axis": None},
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}},
        "*lm_head*": {"enable": False},
        "nn.Linear": {"*input_quantizer": {"enable": False}},
        "nn.Conv2d": {"*weight_quantizer": {"num_bits": 8, "axis": 0}},
        "*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None},
    },
    "dict_form_default_last": {"*weight_quantizer": {"num_bits": 4}, "default": {"enable": False}},
    "enable_only_on_fresh_quantizers": {"*weight_quantizer": {"enable": True}, "*output_quantizer": {"enable": True}},
    "only_some_configured": [{"quantizer_name": "*mlp*", "cfg": {"num_bits": 6}}],
    "cfg_replaces_not_merges": [
        {"quantizer_name": "*", "cfg": {"num_bits": 8, "axis": 0, "unsigned": True}},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4}},
    ],
    "inner_enable_ignored": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*q_proj*", "cfg": {"num_bits": 8, "enable": False}},
    ],
    "parent_class_exact_type": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": {"num_bits": 5}},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.LayerNorm", "cfg": {"num_bits": 7}},
    ],
    "sequence_then_toggles": [
        {"quantizer_name": "*weight_quantizer", "cfg": SEQ},
        {"quantizer_name": "*fc1.weight_quantizer", "cfg": {"num_bits": 8}},
        {"quantizer_name": "*weight_quantizer", "enable": False},
        {"quantizer_name": "*fc2.weight_quantizer", "enable": True},
    ],
    "disable_turns_rotation_off": [
        {"quantizer_name": "*", "cfg": {"num_bits": 8, "rotate": True}},
        {"quantizer_name": "*input_quantizer", "enable": False},
        {"quantizer_name": "*input_quantizer", "enable": True},
        {"quantizer_name": "*k_bmm_quantizer", "cfg": {"num_bits": 8, "rotate": {"enable": True, "block_size": 8}}},
        {"quantizer_name": "*k_bmm_quantizer", "enable": False},
    ],
    "kv_on_top_of_fp8": qc.FP8_DEFAULT_CFG["quant_cfg"] + qc.NVFP4_AFFINE_KV_CFG["quant_cfg"],
}


@pytest.mark.modelopt
@pytest.mark.parametrize("case", sorted(CORNER_CFGS))
def test_precedence_corners_match_modelopt(mtq, case, capsys):
    model, orig = _configured_by_modelopt(CORNER_CFGS[case])
    _compare(model, orig, qc.normalize_quant_cfg(CORNER_CFGS[case]))


@pytest.mark.modelopt
def test_filter_functions_match_modelopt(mtq, capsys):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.conversion import (
        replace_quant_module,
        set_quantizer_attributes_full,
        set_quantizer_attributes_partial,
    )
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    def in_block(name):
        return name.startswith("block.") and name.endswith("weight_quantizer")

    def experts(name):
        return ".experts." in name

    orig = Net()
    model = copy.deepcopy(orig)
    replace_quant_module(model)
    set_quantizer_attributes_partial(model, "*", {"enable": False})
    set_quantizer_attributes_full(model, in_block, QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 16}))
    set_quantizer_attributes_partial(model, experts, {"enable": False})
    set_quantizer_attributes_full(
        model, "*input_quantizer", QuantizerAttributeConfig(num_bits=(4, 3)), parent_class=QuantModuleRegistry["nn.Linear"]
    )

    rules = qc.normalize_quant_cfg(
        {
            "*": {"enable": False},
            in_block: {"num_bits": 4, "block_sizes": {-1: 16}},
            experts: {"enable": False},
            "nn.Linear": {"*input_quantizer": {"num_bits": (4, 3)}},
        }
    )
    _compare(model, orig, rules)


def test_rule_matches_wildcards_and_classes():
    lin, my, ln = nn.Linear(2, 2), MyLinear(2, 2), nn.LayerNorm(2)
    r = Rule("*[kv]_bmm_quantizer")
    assert qc.rule_matches(r, "layers.0.attn.k_bmm_quantizer", None)
    assert not qc.rule_matches(r, "layers.0.attn.q_bmm_quantizer", None)
    assert qc.rule_matches(Rule("*"), "a.b.c.input_quantizer", None)  # "*" crosses dots
    assert not qc.rule_matches(Rule("*Weight_quantizer"), "fc.weight_quantizer", None)  # case-sensitive
    assert qc.rule_matches(Rule("mtp.*"), "mtp.fc.weight_quantizer", None)
    assert not qc.rule_matches(Rule("mtp.*"), "model.mtp.fc.weight_quantizer", None)  # anchored
    # Fused-expert quantizer lists match the singular wildcard.
    assert qc.rule_matches(Rule("*weight_quantizer"), "moe.experts.gate_up_proj_weight_quantizers.3", None)
    for spelling in ("nn.Linear", "Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear", nn.Linear):
        rule = Rule("*", parent_class=spelling)
        assert qc.rule_matches(rule, "fc.weight_quantizer", lin), spelling
        assert not qc.rule_matches(rule, "fc.weight_quantizer", my), spelling  # exact class, as ModelOpt
        assert not qc.rule_matches(rule, "fc.weight_quantizer", ln), spelling
    assert qc.rule_matches(Rule("*", parent_class="MyLinear"), "fc.weight_quantizer", my)
    assert qc.rule_matches(Rule(lambda n: n.startswith("fc")), "fc.weight_quantizer", None)


def test_resolve_returns_none_when_nothing_matches_and_lists_for_sequences():
    rules, _ = qc.normalize_config("W4A8_AWQ_BETA_CFG")
    lin = nn.Linear(4, 4)
    w = qc.resolve_attributes(rules, "fc.weight_quantizer", lin)
    assert [a.num_bits for a in w] == [4, (4, 3)] and all(a.enable for a in w)
    assert all(not a.enable for a in qc.resolve_attributes(rules, "lm_head.weight_quantizer", lin))
    assert qc.resolve_attributes(qc.normalize_config("FP8_KV_CFG")[0], "fc.weight_quantizer", lin) is None
    assert qc.resolve_attributes([], "fc.weight_quantizer", lin) is None


def test_enable_only_rule_toggles_default_or_given_initial_state():
    rules = qc.normalize_quant_cfg([{"quantizer_name": "*", "enable": False}])
    a = qc.resolve_attributes(rules, "fc.weight_quantizer", nn.Linear(2, 2))
    assert a == QA(enable=False, axis=0)
    b = qc.resolve_attributes(rules, "fc.weight_quantizer", nn.Linear(2, 2), initial=QA(num_bits=4))
    assert b == QA(enable=False, num_bits=4)
    assert qc.default_attributes("fc.output_quantizer", nn.Linear(2, 2)) == QA(enable=False)
    assert qc.default_attributes("emb.weight_quantizer", nn.Embedding(2, 2)) == QA()


@pytest.mark.modelopt
def test_sequence_over_sequence_replaces_where_modelopt_nests(mtq, capsys):
    from modelopt.torch.quantization.nn import SequentialQuantizer

    cfg = [
        {"quantizer_name": "*weight_quantizer", "cfg": SEQ},
        {"quantizer_name": "*lm_head.weight_quantizer", "cfg": [{"num_bits": 6}]},
    ]
    model, orig = _configured_by_modelopt(cfg)
    # ModelOpt 0.47 matches the members "lm_head.weight_quantizer.0" too (its fused-expert name
    # normalisation drops the ".0") and turns each into a nested sequence.
    assert isinstance(model.lm_head.weight_quantizer[0], SequentialQuantizer)
    got = qc.resolve_attributes(qc.normalize_quant_cfg(cfg), "lm_head.weight_quantizer", orig.lm_head)
    assert got == [QA(num_bits=6)]
