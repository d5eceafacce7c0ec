"""The torch.compile fallback for models torch.export cannot trace whole (issue 2, item 4)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import QpassError, QuantConfigError, TraceError


class _Block(nn.Module):
    """q/k/v read one tensor; the conv runs over the sequence."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4, -1) @ self.v(x)
        a = a + self.conv(a.transpose(1, 2)).transpose(1, 2)
        return x + self.out(torch.relu(a))


class _Untraceable(nn.Module):
    """Two blocks run by one loop whose trip count is data-dependent (torch.export fails on it,
    dynamo breaks the graph there); each block is compiled once and runs with both blocks' weights."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if x.abs().mean() > 100:  # data-dependent Python control flow
                x = x / 2
        return self.head(x)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5 + i, 16, generator=g) for i in range(n)]


def _quantize(model, cfg="INT8_DEFAULT_CFG", **kw):
    batches = _batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qpass.quantize(model, cfg, lambda m: [m(b) for b in batches], **kw)
    return [str(w.message) for w in caught]


def _untraceable():
    torch.manual_seed(0)
    return _Untraceable().eval()


def test_falls_back_warns_with_break_reason_and_quantizes_every_weighted_op():
    model = _untraceable()
    x = _batches()[0]
    with torch.no_grad():
        fp = model(x)
    messages = _quantize(model)
    fallback = [m for m in messages if "captured the model with torch.compile" in m]
    assert len(fallback) == 1, messages
    assert "torch.export could not trace the model" in fallback[0]
    from qpass.summary import format_summary

    assert "captured with torch.compile (torch.export could not trace it whole)" in format_summary(model)
    breaks = qpass.graph_breaks(model)
    assert breaks and any("test_compile_fallback.py" in b and "x.abs().mean() > 100" in b for b in breaks), breaks
    # every Linear/Conv input quantizer was calibrated (each block's compiled graph served both blocks)
    names = [n for n, _ in model.named_modules() if n.endswith("input_quantizer")]
    assert len(names) == 11
    for n in names:
        assert model.get_submodule(n).amax is not None, n
    # q/k/v read one tensor: one group per block, found at run time, sharing one input amax
    assert qpass.shared_input_groups(model) == [[f"blocks.{i}.k", f"blocks.{i}.q", f"blocks.{i}.v"] for i in (0, 1)]
    with torch.no_grad():
        q = model(x)
        assert not torch.equal(q, fp)
        qpass.disable_quantizer(model, "*")
        torch.testing.assert_close(model(x), fp, rtol=0, atol=0)
        qpass.enable_quantizer(model, "*input_quantizer")
        qpass.enable_quantizer(model, "*weight_quantizer")
        torch.testing.assert_close(model(x), q, rtol=0, atol=0)


def test_fallback_matches_modelopt_names_amax_and_outputs():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    ours, theirs = _untraceable(), _untraceable()
    batches = _batches()
    x = batches[0]
    _quantize(ours)
    mtq.quantize(theirs, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: [m(b) for b in batches])

    def quantizers(m):
        return {n: q for n, q in m.named_modules() if n.endswith("_quantizer")}

    a, b = quantizers(ours), quantizers(theirs)
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].is_enabled == b[n].is_enabled, n
        if b[n].is_enabled:
            rel = ((a[n].amax - b[n].amax).abs() / b[n].amax.abs()).max()
            assert rel < 1e-6, (n, a[n].amax, b[n].amax)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(ours(x).flatten(), theirs(x).flatten(), dim=0)
    assert cos > 0.9999


def test_capture_export_keeps_the_error_and_the_model():
    model = _untraceable()
    x = _batches()[0]
    ref = model(x)
    with pytest.raises(TraceError, match=r"torch.export could not trace the model: module "):
        _quantize(model, capture="export")
    assert type(model) is _Untraceable and "_qpass_state" not in model.__dict__
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(QuantConfigError, match="capture must be 'auto' or 'export', got 'dynamo'"):
        _quantize(model, capture="dynamo")


def _int8_with_kv():
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    kv = {"num_bits": (4, 3), "axis": None, "enable": True}
    if isinstance(cfg["quant_cfg"], dict):
        cfg["quant_cfg"]["*[kv]_bmm_quantizer"] = kv
    else:
        cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": kv})
    return cfg


@pytest.mark.parametrize("cfg, message", [
    ("INT8_SMOOTHQUANT_CFG", r"algorithm 'smoothquant' needs a whole graph"),
    ({"quant_cfg": copy.deepcopy(qpass.INT8_DEFAULT_CFG["quant_cfg"]),
      "algorithm": {"method": "real_quantize", "additional_algorithm": "max"}},
     r"algorithm 'real_quantize' needs a whole graph"),
    (_int8_with_kv(), r"attention \(bmm/softmax\) quantizers"),
])
def test_what_needs_a_whole_graph_is_refused_and_the_model_untouched(cfg, message):
    model = _untraceable()
    x = _batches()[0]
    ref = model(x)
    with pytest.raises(TraceError, match=message):
        _quantize(model, cfg)
    assert type(model) is _Untraceable and "_qpass_state" not in model.__dict__
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_modelopt_rules_are_refused():
    class WithNorm(_Untraceable):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return super().forward(self.norm(x))

    torch.manual_seed(0)
    model = WithNorm().eval()
    with pytest.raises(TraceError, match=r"quantizer 'norm.input_quantizer' is not on a Linear/Conv"):
        _quantize(model, rules="modelopt")
    assert type(model) is WithNorm


def test_later_calls_export_and_copies():
    model = _untraceable()
    _quantize(model)
    x = _batches()[0]
    with torch.no_grad():
        q = model(x)
        # a later smoothquant pass on the fallback is refused, the amax kept
        amax = model.blocks[0].q.input_quantizer.amax.clone()
        with pytest.raises(TraceError, match="algorithm 'smoothquant' needs a whole graph"):
            qpass.calibrate(model, "smoothquant", lambda m: m(x))
        torch.testing.assert_close(model.blocks[0].q.input_quantizer.amax, amax, rtol=0, atol=0)
        torch.testing.assert_close(model(x), q, rtol=0, atol=0)
        # ONNX export needs the whole graph: the export's own error, naming the module
        with pytest.raises(QpassError, match="torch.export could not trace the model"):
            qpass.export_onnx(model, "/nonexistent/never_written.onnx", example_inputs=(x,))
        # a copy compiles afresh for itself and is independent of the original
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), q, rtol=0, atol=0)
        qpass.disable_quantizer(twin, "*")
        torch.testing.assert_close(model(x), q, rtol=0, atol=0)
        assert not torch.equal(twin(x), q)


def test_longformer_falls_back_and_matches_modelopt():
    """A real HF model torch.export cannot trace (Longformer's sliding-window attention sizes its
    chunks from data): the fallback's amax equal ModelOpt's, and so do its outputs once ModelOpt's
    LayerNorm input quantizers (which qpass's default rules leave out) are disabled."""
    transformers = pytest.importorskip("transformers")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, attention_window=[4, 4], max_position_embeddings=80)
    base = transformers.LongformerModel(cfg).eval()
    ids = [torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(ours, "INT8_DEFAULT_CFG", lambda m: [m(input_ids=i) for i in ids])
    mtq.quantize(theirs, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: [m(input_ids=i) for i in ids])
    mtq.disable_quantizer(theirs, "*LayerNorm*")
    assert any("Tensor.item()" in b or "Data dependent" in b for b in qpass.graph_breaks(ours))
    checked = 0
    for n, q in ours.named_modules():
        if n.endswith("_quantizer") and getattr(q, "amax", None) is not None:
            other = theirs.get_submodule(n).amax
            assert ((q.amax - other).abs() / other.abs()).max() < 1e-6, n
            checked += 1
    # per layer: input and weight of query, key, value, attention.output.dense, intermediate.dense and
    # output.dense, and the weights of the unused query/key/value_global; the pooler's input and weight
    assert checked == 2 * (6 * 2 + 3) + 2
    with torch.no_grad():
        a = ours(input_ids=ids[0]).last_hidden_state
        b = theirs(input_ids=ids[0]).last_hidden_state
        fp = base(input_ids=ids[0]).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999
    assert not torch.equal(a, fp)


def test_frames_dynamo_runs_eagerly_are_quantized_alike():
    """A frame dynamo does not compile (skipped, or past its recompile limit) runs in Python: the
    module hooks quantize its Linear/Conv calls exactly as the captured graphs do."""
    model = _untraceable()
    _quantize(model)
    xs = _batches(4)
    with torch.no_grad():
        compiled = [model(x) for x in xs]
        with torch.compiler.set_stance("force_eager"):
            eager = [model(x) for x in xs]
        qpass.disable_quantizer(model, "*")
        with torch.compiler.set_stance("force_eager"):
            plain = model(xs[0])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(plain, eager[0])
    # output quantizers too (enabled after calibration: each output's own range)
    qpass.enable_quantizer(model, "*")
    with torch.no_grad():
        compiled = model(xs[0])
        with torch.compiler.set_stance("force_eager"):
            eager = model(xs[0])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    qpass.disable_quantizer(model, "*output_quantizer")
    with torch.no_grad():
        assert not torch.equal(model(xs[0]), compiled)
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in [m.__dict__.get("weight")])


def test_auto_quantize_says_it_needs_a_whole_graph():
    model = _untraceable()
    xs = _batches()
    ref = model(xs[0])
    with pytest.raises(TraceError, match=r"auto_quantize \(it scores layers on the traced graph\) needs the model "
                                         r"traced whole"):
        qpass.auto_quantize(model, constraints={"effective_bits": 6.0},
                            quantization_formats=["INT8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"],
                            data_loader=xs, forward_step=lambda m, b: m(b), loss_func=lambda o, b: o.pow(2).mean())
    assert type(model) is _Untraceable and not [n for n, _ in model.named_modules() if n.endswith("quantizer")]
    torch.testing.assert_close(model(xs[0]), ref, rtol=0, atol=0)


def test_save_restore_fold_and_training_on_the_fallback(tmp_path):
    model = _untraceable()
    _quantize(model)
    x = _batches()[0]
    with torch.no_grad():
        q = model(x)
    path = str(tmp_path / "m.qpass")
    qpass.save(model, path)
    again = _untraceable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.restore(again, path)
        with torch.no_grad():
            torch.testing.assert_close(again(x), q, rtol=0, atol=0)
    folded = copy.deepcopy(model)
    qpass.fold_weight(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), q, rtol=0, atol=0)
    # a parameter replaced after quantize (load_state_dict(assign=True)) is still quantized
    replaced = copy.deepcopy(model)
    with torch.no_grad():
        replaced(x)
    replaced.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(replaced(x), q, rtol=0, atol=0)
    model.train()
    model(x).sum().backward()  # straight-through gradients reach the weights
    assert model.blocks[1].q.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_fallback_equals_the_traced_graph_on_a_model_that_traces(monkeypatch):
    """The same HF Llama quantized twice: through torch.export, and through the fallback (export made
    to fail). Same quantizers, amax and shared-input groups; outputs, generate() and a second input
    structure (an attention mask) agree."""
    pytest.importorskip("transformers")
    from conftest import tiny_llama

    from qpass.graph import quantized_model

    torch.manual_seed(0)
    base = tiny_llama(layers=2, tie=False).eval()
    ids = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    traced, fallen = copy.deepcopy(base), copy.deepcopy(base)
    qpass.quantize(traced, "INT8_DEFAULT_CFG", lambda m: [m(input_ids=i) for i in ids])

    def no_export(*a, **k):
        raise TraceError("torch.export could not trace the model: module 'model' (simulated). The model was left "
                         "unchanged.")

    monkeypatch.setattr(quantized_model, "cached_export", no_export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qpass.quantize(fallen, "INT8_DEFAULT_CFG", lambda m: [m(input_ids=i) for i in ids])
    assert any("(simulated)" in str(w.message) and "captured the model with torch.compile" in str(w.message)
               for w in caught)
    a = {n: q for n, q in traced.named_modules() if n.endswith("_quantizer")}
    b = {n: q for n, q in fallen.named_modules() if n.endswith("_quantizer")}
    linear = sorted(n for n in a if n.rsplit(".", 1)[-1] in ("input_quantizer", "weight_quantizer", "output_quantizer"))
    assert linear == sorted(b)  # the fallback has no attention (bmm) slots: they exist on traced graphs only
    for n in linear:
        assert a[n].is_enabled == b[n].is_enabled, n
        if a[n].amax is not None:
            torch.testing.assert_close(b[n].amax, a[n].amax, rtol=1e-6, atol=0)
    assert qpass.shared_input_groups(fallen) == qpass.shared_input_groups(traced)
    x = ids[0]
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        for kw in ({"input_ids": x}, {"input_ids": x, "attention_mask": mask}):
            cos = torch.nn.functional.cosine_similarity(traced(**kw).logits.flatten(), fallen(**kw).logits.flatten(),
                                                        dim=0)
            assert cos > 0.99999, (kw.keys(), cos)
        assert torch.equal(traced.generate(x[:1], max_new_tokens=4, do_sample=False),
                           fallen.generate(x[:1], max_new_tokens=4, do_sample=False))


def test_layerwise_calibration_says_it_needs_a_whole_graph():
    model = _untraceable()
    x = _batches()[0]
    cfg = {"quant_cfg": copy.deepcopy(qpass.INT8_DEFAULT_CFG["quant_cfg"]),
           "algorithm": {"method": "max", "layerwise": {"enable": True}}}
    with pytest.raises(TraceError, match="layer-by-layer calibration needs the model traced whole"):
        qpass.quantize(model, cfg, lambda m: m(x))
    assert type(model) is _Untraceable
    _quantize(model)  # then whole-model max through the fallback, and a layerwise pass on it is refused
    amax = model.head.input_quantizer.amax.clone()
    with pytest.raises(TraceError, match="layer-by-layer calibration needs the model traced whole"):
        qpass.calibrate(model, "max", lambda m: m(x), layerwise=True)
    torch.testing.assert_close(model.head.input_quantizer.amax, amax, rtol=0, atol=0)


@pytest.mark.cuda
def test_fallback_on_cuda_equals_the_cpu():
    """On a GPU the fallback's amax equal the CPU run's, and its outputs agree."""
    cpu, gpu = _untraceable(), _untraceable().cuda()
    batches = _batches()
    _quantize(cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(gpu, "INT8_DEFAULT_CFG", lambda m: [m(b.cuda()) for b in batches])
    for n, q in cpu.named_modules():
        if n.endswith("_quantizer") and getattr(q, "amax", None) is not None:
            torch.testing.assert_close(gpu.get_submodule(n).amax.cpu(), q.amax, rtol=1e-5, atol=0)
    with torch.no_grad():
        a, b = cpu(batches[0]), gpu(batches[0].cuda()).cpu()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999
