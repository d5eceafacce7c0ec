"""The model_quant API on small synthetic models: behaviour, errors, rollback."""

import copy
import io
import re
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import CalibrationError, QpassError, QuantConfigError, TraceError
from qpass.graph.quantized_model import state_of
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import MLP, tiny_bert, tiny_llama


def _loop(batches):
    return lambda m: [m(b) for b in batches]


def _quantizer_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _assert_untouched(model, reference, x, cls):
    assert type(model) is cls
    assert not _quantizer_names(model)
    assert "_qpass_state" not in model.__dict__
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_quantize_in_place_names_and_outputs(mlp):
    x = torch.randn(4, 8, 32)
    ref = mlp(x)
    out = qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x]))
    assert out is mlp
    assert isinstance(mlp, MLP)
    assert _quantizer_names(mlp) == {
        f"fc{i}.{s}" for i in (1, 2) for s in ("input_quantizer", "weight_quantizer", "output_quantizer")
    }
    assert mlp.fc1.input_quantizer.is_enabled and not mlp.fc1.output_quantizer.is_enabled
    assert mlp.fc1.weight_quantizer.amax.shape == (64, 1)
    assert "fc1.input_quantizer._amax" in mlp.state_dict()
    y = mlp(x)
    assert not torch.equal(y, ref)
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999


def test_weight_only_needs_no_forward_loop(mlp):
    x = torch.randn(2, 32)
    qpass.quantize(mlp, qpass.INT8_WEIGHT_ONLY_CFG)
    assert mlp.fc1.weight_quantizer.amax is not None
    assert not mlp.fc1.input_quantizer.is_enabled
    assert not state_of(mlp).graphs  # nothing traced yet
    w = mlp.fc1.weight
    expected = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x, mlp.fc1.weight_quantizer(w), mlp.fc1.bias)),
        mlp.fc2.weight_quantizer(mlp.fc2.weight), mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), expected)


def test_lazy_capture_per_input_structure_shares_quantizers():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids, use_cache=False))
    state = state_of(model)
    assert len(state.graphs) == 1
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert len(state.graphs) == 2
    names_before = _quantizer_names(model)
    model(input_ids=torch.randint(0, 128, (3, 7)), use_cache=False)  # new batch and length: same graph
    assert len(state.graphs) == 2
    assert _quantizer_names(model) == names_before
    q = model.model.layers[0].self_attn.q_proj.input_quantizer
    for traced in sum(state.graphs.values(), []):
        assert traced.gm.get_submodule("model.layers.0.self_attn.q_proj.input_quantizer") is q


class _Box:
    """A one-leaf pytree container (registered below), e.g. a framework's wrapper of one tensor."""

    def __init__(self, t):
        self.t = t


def test_input_structure_key_tells_every_container_apart():
    """The graph cache key: plain tuples/lists/dicts by their structure (traceable by dynamo), any
    other object by its type; containers pytree flattens to another leaf count by their treespec."""
    import collections

    import torch.utils._pytree as pytree

    from qpass.graph.quantized_model import _input_key

    if _Box not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(_Box, lambda b: ([b.t], None), lambda c, _: _Box(c[0]))
    t = torch.ones(2, 3)
    keys = {}
    for name, args, kwargs in [
        ("tensor", (t,), {}), ("box", (_Box(t),), {}), ("list", ([t],), {}), ("tuple", ((t,),), {}),
        ("dict", ({"a": t},), {}), ("kw", (), {"x": t}), ("kw_other", (), {"y": t}),
        ("pair", (collections.namedtuple("P", "a b")(t, t),), {}), ("two", (t, t), {}),
    ]:
        key, tensors = _input_key(False, args, kwargs)
        assert all(x is t for x in tensors), name
        keys[name] = key
    assert len(set(keys.values())) == len(keys), keys
    assert _input_key(False, (), {"y": t, "x": t})[0] == _input_key(False, (), {"x": t, "y": t})[0]


def test_example_inputs_trace_eagerly(mlp):
    qpass.quantize(mlp, qpass.INT8_WEIGHT_ONLY_CFG, example_inputs=torch.randn(2, 32))
    assert len(state_of(mlp).graphs) == 1


def test_hf_conveniences_survive():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    qpass.quantize(model, qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    assert model.config.hidden_size == 64
    out = model(input_ids=ids)
    assert isinstance(out, CausalLMOutputWithPast)
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 10)


def test_shared_input_groups_share_amax(attention):
    x = torch.randn(2, 5, 32)
    qpass.quantize(attention, qpass.INT8_DEFAULT_CFG, _loop([x, 3 * torch.randn(2, 9, 32)]))
    assert qpass.shared_input_groups(attention) == [["k_proj", "q_proj", "v_proj"]]
    amaxes = [getattr(attention, p).input_quantizer.amax for p in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(a, amaxes[0]) for a in amaxes)
    assert not torch.equal(attention.o_proj.input_quantizer.amax, amaxes[0])


def test_modelopt_rules_add_input_only_quantizers(attention):
    x = torch.randn(2, 5, 32)
    qpass.quantize(attention, qpass.INT8_DEFAULT_CFG, _loop([x]), rules="modelopt")
    assert attention.norm.input_quantizer.is_enabled
    assert attention.norm.input_quantizer.amax is not None
    assert "norm.output_quantizer" in _quantizer_names(attention)


def test_default_rules_leave_layernorm_alone(attention):
    qpass.quantize(attention, qpass.INT8_DEFAULT_CFG, _loop([torch.randn(2, 5, 32)]))
    assert not any(n.startswith("norm.") for n in _quantizer_names(attention))


def test_unknown_preset_leaves_model_untouched(mlp):
    x = torch.randn(2, 32)
    ref = mlp(x)
    with pytest.raises(QuantConfigError, match="INT9_CFG"):
        qpass.quantize(mlp, "INT9_CFG", _loop([x]))
    _assert_untouched(mlp, ref, x, MLP)


def test_malformed_quant_cfg_names_the_key(mlp):
    x = torch.randn(2, 32)
    ref = mlp(x)
    bad = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0, "bogus": 1}}, "algorithm": "max"}
    with pytest.raises(QuantConfigError, match="bogus"):
        qpass.quantize(mlp, bad, _loop([x]))
    _assert_untouched(mlp, ref, x, MLP)


def test_activation_config_without_forward_loop_errors(mlp):
    x = torch.randn(2, 32)
    ref = mlp(x)
    with pytest.raises(CalibrationError, match="no forward_loop"):
        qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG)
    _assert_untouched(mlp, ref, x, MLP)


def test_forward_loop_that_never_runs_errors(mlp):
    x = torch.randn(2, 32)
    ref = mlp(x)
    with pytest.raises(CalibrationError, match="never called the model"):
        qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, lambda m: None)
    _assert_untouched(mlp, ref, x, MLP)


class _TwoExperts(nn.Module):
    """An MoE-like layer whose second expert gets no tokens from this data."""

    def __init__(self):
        super().__init__()
        self.expert0 = nn.Linear(8, 8)
        self.expert1 = nn.Linear(8, 8)
        self.unused_head = nn.Linear(8, 8)

    def forward(self, x):
        routed = x[:, :0]  # expert1's token slice is empty for this input
        return self.expert0(x).sum(-1) + self.expert1(routed).sum()


def test_quantizer_without_calibration_data_is_reported():
    torch.manual_seed(0)
    model = _TwoExperts()
    x = torch.randn(2, 3, 8)
    ref = model(x)
    with pytest.raises(CalibrationError, match=r"saw no calibration data: 'expert1.input_quantizer'"):
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, _loop([x]))
    _assert_untouched(model, ref, x, _TwoExperts)


def test_module_outside_the_traced_forward_is_warned_about():
    torch.manual_seed(0)
    model = MLP()
    model.spare = nn.Linear(32, 32)  # registered but never called
    with pytest.warns(UserWarning, match=r"spare.input_quantizer"):
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, _loop([torch.randn(2, 32)]))
    assert model.fc1.input_quantizer.amax is not None


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(x)


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return x


def test_untraceable_model_names_module_and_is_untouched():
    torch.manual_seed(0)
    model = _DataDependent()
    x = torch.randn(2, 8)
    ref = model(x)
    with pytest.raises(TraceError, match=r"module 'gate' \(_Gate\)"):
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, _loop([x]), capture="export")
    _assert_untouched(model, ref, x, _DataDependent)


def test_nan_activations_name_the_quantizer(mlp):
    x = torch.randn(2, 32)
    ref = mlp(x)
    bad = x.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(CalibrationError, match="'fc1.input_quantizer' saw NaN or Inf"):
        qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x, bad]))
    _assert_untouched(mlp, ref, x, MLP)


def test_non_finite_running_amax_is_caught_when_loaded():
    """On a GPU the per-batch check is deferred to the collected amax (NaN/Inf carry through the
    running max); the error names the quantizer and the last input's shape."""
    from qpass.nn.tensor_quantizer import TensorQuantizer

    q = TensorQuantizer({"num_bits": 8}, name="blk.fc.input_quantizer")
    q.enable_calib()
    q.calibrator.collect_amax(torch.tensor(float("inf")))  # what a CUDA batch with Inf leaves
    q.__dict__["_calib_input"] = ((2, 5), torch.bfloat16)
    with pytest.raises(CalibrationError, match=r"'blk.fc.input_quantizer' saw NaN or Inf .*shape \(2, 5\)"):
        q.load_calib_amax()
    assert q.amax is None


def test_forward_loop_raising_halfway_keeps_model_usable(mlp):
    x = torch.randn(4, 32)
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x]))
    amax = mlp.fc1.input_quantizer.amax.clone()
    y = mlp(x)

    def broken(m):
        m(10 * x)
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        qpass.calibrate(mlp, "max", broken)
    assert torch.equal(mlp.fc1.input_quantizer.amax, amax)
    torch.testing.assert_close(mlp(x), y, rtol=0, atol=0)
    qpass.calibrate(mlp, "max", _loop([10 * x]))
    assert mlp.fc1.input_quantizer.amax > amax


def test_calibrating_twice_is_deterministic(mlp):
    batches = [torch.randn(4, 32) for _ in range(3)]
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop(batches))
    first = {n: q.amax.clone() for n, q in mlp.named_modules() if isinstance(q, TensorQuantizer) and q.amax is not None}
    qpass.calibrate(mlp, "max", _loop(batches))
    for n, q in mlp.named_modules():
        if n in first:
            assert torch.equal(q.amax, first[n])


def test_quantizing_twice_is_a_clear_error(mlp):
    x = torch.randn(2, 32)
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x]))
    with pytest.raises(QpassError, match="already quantized"):
        qpass.quantize(mlp, qpass.FP8_DEFAULT_CFG, _loop([x]))


def test_enable_disable_and_postprocess_amax(mlp):
    x = torch.randn(2, 32)
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x]))
    qpass.disable_quantizer(mlp, "*input_quantizer")
    assert not mlp.fc1.input_quantizer.is_enabled
    qpass.enable_quantizer(mlp, lambda name: name == "fc1.input_quantizer")
    assert mlp.fc1.input_quantizer.is_enabled and not mlp.fc2.input_quantizer.is_enabled
    before = mlp.fc1.input_quantizer.amax.clone()
    qpass.postprocess_amax(mlp, "*fc1.input_quantizer", lambda a: a * 2)
    assert torch.equal(mlp.fc1.input_quantizer.amax, before * 2)


def test_fold_weight_removes_weight_quantizer_nodes(mlp):
    x = torch.randn(2, 32)
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([x]))
    y = mlp(x)
    qpass.fold_weight(mlp)
    torch.testing.assert_close(mlp(x), y)
    for traced in sum(state_of(mlp).graphs.values(), []):
        targets = [n.target for n in traced.gm.graph.nodes if n.op == "call_module"]
        assert not any(t.endswith("weight_quantizer") for t in targets)


def test_fold_weight_unties_shared_weights():
    model = tiny_llama(tie=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (1, 6))
    cfg = copy.deepcopy(qpass.INT8_WEIGHT_ONLY_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": True})
    qpass.quantize(model, cfg, lambda m: m(input_ids=ids))
    out = model(input_ids=ids).logits
    qpass.fold_weight(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(model.lm_head.weight, emb)
    # The graph's embedding lookup still reads the original table, so outputs are unchanged.
    torch.testing.assert_close(model(input_ids=ids).logits, out)


def test_print_quant_summary_lists_every_quantizer(mlp):
    qpass.quantize(mlp, qpass.INT8_DEFAULT_CFG, _loop([torch.randn(2, 32)]))
    buf = io.StringIO()
    with redirect_stdout(buf):
        qpass.print_quant_summary(mlp)
    text = buf.getvalue()
    assert "fc1.weight_quantizer" in text and "fc2.output_quantizer" in text
    assert "6 quantizers: 4 enabled, 2 disabled, 4 with amax" in text


def test_unmatched_pattern_warns(mlp):
    cfg = copy.deepcopy(qpass.INT8_WEIGHT_ONLY_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*nonexistent*", "cfg": {"num_bits": 4}})
    with pytest.warns(UserWarning, match=r"\*nonexistent\*"):
        qpass.quantize(mlp, cfg)


def test_bert_quantizes_with_dynamic_shapes():
    model = tiny_bert()
    batches = [dict(input_ids=torch.randint(0, 128, (b, s)), attention_mask=torch.ones(b, s, dtype=torch.long))
               for b, s in ((2, 9), (3, 17), (1, 5))]
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in batches])
    assert sum(len(v) for v in state_of(model).graphs.values()) <= 2
    assert model.encoder.layer[0].attention.self.query.input_quantizer.amax is not None


def test_every_preset_quantizes_or_names_its_missing_algorithm(attention):
    """Each of the 39 presets either runs end to end or refuses with qpass's own error."""
    x = torch.randn(2, 5, 32)
    for name in sorted(qpass.config.choices):
        model = copy.deepcopy(attention)
        ref = model(x)
        try:
            qpass.quantize(model, name, _loop([x]))
        except QuantConfigError as e:
            assert re.search("not implemented yet|not supported by qpass", str(e)), (name, e)
            assert type(model) is type(attention)
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
            continue
        out = model(x)
        assert torch.isfinite(out).all(), name


def test_dynamic_per_token_quantizer_needs_no_calibration(mlp):
    x = torch.randn(3, 32)
    qpass.quantize(mlp, "FP8_PER_CHANNEL_PER_TOKEN_CFG", _loop([x]))
    assert mlp.fc1.input_quantizer.is_enabled and mlp.fc1.input_quantizer.amax is None
    assert mlp(torch.randn(5, 32)).shape == (5, 32)


@pytest.mark.parametrize("weight_cfg", [
    {"num_bits": 8, "axis": 0},
    {"num_bits": (4, 3), "axis": None},
    {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}},
    {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
])
def test_real_quant_weights_equal_fake_quant(mlp, weight_cfg):
    x = torch.randn(3, 32)
    outs = []
    for fake in (True, False):
        model = copy.deepcopy(mlp)
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                             {"quantizer_name": "*weight_quantizer", "cfg": dict(weight_cfg, fake_quant=fake)}],
               "algorithm": "max"}
        qpass.quantize(model, cfg)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("algorithm", [None, "<missing>"])
def test_unsupported_format_fails_quantize_not_the_first_forward(mlp, algorithm):
    """num_bits=9 passes attribute validation (ModelOpt's rule); without calibration nothing built
    the format, so quantize returned and the first forward raised. Found by tests/robustness."""
    x = torch.randn(2, 32)
    ref = mlp(x)
    cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": 9}}}
    if algorithm != "<missing>":
        cfg["algorithm"] = algorithm
    with pytest.raises(QuantConfigError, match="num_bits=9 is not supported"):
        qpass.quantize(mlp, cfg, _loop([x]))
    _assert_untouched(mlp, ref, x, MLP)
