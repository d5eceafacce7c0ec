"""Fused mixture-of-experts layers (transformers 5: ``experts.gate_up_proj [E, 2I, H]`` and
``experts.down_proj [E, H, I]``, run through a grouped matmul): per-expert weight quantizers and
one input quantizer per parameter, with ModelOpt 0.47's names, amax values and outputs."""

import copy
import os
import warnings

import pytest
import torch

import qpass
from qpass.errors import ExportError
from qpass.graph.quantized_model import state_of
from qpass.nn.tensor_quantizer import ExpertQuantizers, TensorQuantizer
from qpass.passes.insert_quantizers import QUANTIZER_META

from conftest import has_package

pytestmark = pytest.mark.skipif(not has_package("transformers"), reason="transformers not installed")

EXPERTS = 4


def tiny_mixtral(layers=2, top_k=2, **kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=top_k, max_position_embeddings=128, **kw)
    return MixtralForCausalLM(cfg).eval()


def tiny_gpt_oss(layers=2):
    """GPT-OSS keeps its experts transposed (``[E, in, out]``, ``is_transposed=True``), with biases,
    and its attention drops a sink column from the probabilities."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                       num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * layers)
    return GptOssForCausalLM(cfg).eval()


def tiny_llama4(layers=2):
    """Llama 4's experts predate ``is_transposed``: ``[E, in, out]`` parameters multiplied by bmm."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=EXPERTS, num_experts_per_tok=1, head_dim=16,
                           moe_layers=list(range(layers)))
    return Llama4ForCausalLM(cfg).eval()


BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def loop(m):
    for x in BATCHES:
        m(x)


def logits(m, x=BATCHES[0]):
    with torch.no_grad():
        return m(x).logits


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def quantized(cfg=None, **kw):
    m = tiny_mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(cfg or qpass.INT8_DEFAULT_CFG), loop, **kw)
    return m


@pytest.mark.skipif(not has_package("modelopt"), reason="nvidia-modelopt not installed")
@pytest.mark.parametrize("arch,preset", [
    ("mixtral", "INT8_DEFAULT_CFG"), ("mixtral", "FP8_DEFAULT_CFG"), ("mixtral", "INT8_WEIGHT_ONLY_CFG"),
    ("mixtral", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), ("gpt_oss", "INT8_DEFAULT_CFG"),
    ("gpt_oss", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), ("llama4", "INT8_DEFAULT_CFG"),
])
def test_fused_experts_match_modelopt(arch, preset):
    """Same quantizer names and enabled flags as ModelOpt 0.47 (its fused-experts plugins), equal
    max-calibrated amax (per expert for the weights; GPT-OSS's transposed experts blocked along their
    input dim), equal outputs."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer as ModelOptQuantizer

    base = {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss, "llama4": tiny_llama4}[arch]()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(theirs, copy.deepcopy(getattr(mtq, preset)), loop)
    qpass.quantize(ours, copy.deepcopy(getattr(qpass, preset)), loop, rules="modelopt")
    logits(ours)  # weight-only configs trace on the first forward (attention's bmm slots appear then)
    a = {n: q for n, q in theirs.named_modules() if isinstance(q, ModelOptQuantizer)}
    b = {n: q for n, q in ours.named_modules() if isinstance(q, TensorQuantizer)}
    if arch == "llama4":  # Llama4Router subclasses nn.Linear; ModelOpt leaves it out, qpass's are disabled
        assert not any(q.is_enabled for n, q in b.items() if ".router." in n)
        b = {n: q for n, q in b.items() if ".router." not in n}
    assert {n: q.is_enabled for n, q in b.items()} == {n: q.is_enabled for n, q in a.items()}
    experts = [n for n in b if ".experts." in n]
    if arch == "mixtral":
        assert len(experts) == 2 * 2 * (1 + EXPERTS)  # layers x (gate_up, down) x (input + one per expert)
        assert "model.layers.1.mlp.experts.down_proj_weight_quantizers.3" in experts
    else:
        assert len(experts) == 2 * 2 * 2  # one weight quantizer on the whole [E, in, out] parameter
        assert any(n.endswith("layers.1.mlp.experts.down_proj_weight_quantizer")
                   or n.endswith("layers.1.feed_forward.experts.down_proj_weight_quantizer") for n in experts)
    checked = 0
    for n, q in a.items():
        if q.is_enabled and getattr(q, "amax", None) is not None:
            want = q.amax.float()
            got = b[n].amax.float().reshape(want.shape)
            assert torch.allclose(got, want, rtol=1e-6, atol=0), n
            checked += n in experts
    assert checked == sum(1 for n in experts if b[n].is_enabled and b[n].amax is not None) > 0
    assert cosine(logits(ours), logits(theirs)) > 0.9999


def test_each_expert_is_quantized_with_its_own_amax():
    m = quantized()
    experts = m.model.layers[0].mlp.experts
    quantizers = experts.gate_up_proj_weight_quantizers
    assert isinstance(quantizers, ExpertQuantizers) and len(quantizers) == EXPERTS
    w = experts.gate_up_proj.detach()
    fq = quantizers(experts.gate_up_proj)
    for e, q in enumerate(quantizers):
        amax = w[e].abs().amax(1, keepdim=True)  # INT8 weights: per output row, per expert
        assert torch.equal(q.amax, amax)
        scale = amax / 127
        torch.testing.assert_close(fq[e], (w[e] / scale).round().clamp(-127, 127) * scale, rtol=0, atol=1e-7)
    # the graph: the weight quantizer reads the parameter, the input quantizer feeds the grouped matmul
    gm = next(iter(state_of(m).graphs.values()))[0].gm
    placed = {n.meta[QUANTIZER_META]: n for n in gm.graph.nodes if QUANTIZER_META in n.meta}
    w_node = placed["model.layers.0.mlp.experts.gate_up_proj_weight_quantizers"]
    assert w_node.args[0].op == "get_attr" and w_node.args[0].target.endswith("experts.gate_up_proj")
    x_node = placed["model.layers.0.mlp.experts.gate_up_proj_input_quantizer"]
    assert any("grouped_mm" in str(u.target) for u in x_node.users)
    assert float(experts.gate_up_proj_input_quantizer.amax) > 0 and float(experts.down_proj_input_quantizer.amax) > 0
    # quantizing the experts changes the output; switching their quantizers off gives it back
    ref = logits(tiny_mixtral())
    off = copy.deepcopy(m)
    qpass.disable_quantizer(off, "*")
    assert torch.allclose(logits(off), ref, atol=1e-6)
    qpass.disable_quantizer(m, lambda n: ".experts." not in n)
    assert not torch.allclose(logits(m), ref, atol=1e-4)
    assert cosine(logits(m), ref) > 0.999


def test_expert_wildcards_follow_modelopt():
    """ModelOpt 0.47 matches a per-expert quantizer by its full name and by the name with the
    expert index dropped: ``*gate_up_proj_weight_quantizer`` selects every expert of that
    parameter, ``*weight_quantizers.1`` one expert of each, ``*gate_up_proj_weight_quantizers`` none."""
    def enabled(pattern):
        cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
        cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
        m = quantized(cfg)
        ex = m.model.layers[0].mlp.experts
        return ([q.is_enabled for q in ex.gate_up_proj_weight_quantizers],
                [q.is_enabled for q in ex.down_proj_weight_quantizers])

    on, off = [True] * EXPERTS, [False] * EXPERTS
    m = quantized()  # disable_quantizer matches alike
    qpass.disable_quantizer(m, "*gate_up_proj_weight_quantizer")
    assert [q.is_enabled for q in m.model.layers[1].mlp.experts.gate_up_proj_weight_quantizers] == off
    qpass.enable_quantizer(m, "*weight_quantizers.2")
    assert [q.is_enabled for q in m.model.layers[1].mlp.experts.gate_up_proj_weight_quantizers] == [
        False, False, True, False]
    assert enabled("*gate_up_proj_weight_quantizer") == (off, on)
    assert enabled("*gate_up_proj_weight_quantizers") == (on, on)
    assert enabled("*weight_quantizers.1") == ([True, False, True, True], [True, False, True, True])
    assert enabled("*gate_up_proj_weight_quantizers*") == (off, on)
    # a rule that matches experts only by the name without the index is no "unmatched pattern"
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*down_proj_weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = tiny_mixtral()
        qpass.quantize(m, cfg, loop)
    assert not [w for w in caught if "matched no quantizer" in str(w.message)]
    assert m.model.layers[0].mlp.experts.down_proj_weight_quantizers[0].spec.describe().startswith("int4")


def test_fold_weight_folds_expert_weights():
    m = quantized()
    before = logits(m, BATCHES[1])
    experts = m.model.layers[1].mlp.experts
    want = experts.down_proj_weight_quantizers(experts.down_proj).clone()
    qpass.fold_weight(m)
    assert torch.equal(experts.down_proj.detach(), want)
    assert not experts.down_proj_weight_quantizers.is_enabled
    gm = next(iter(state_of(m).graphs.values()))[0].gm
    assert not any(str(n.meta.get(QUANTIZER_META, "")).endswith("_weight_quantizers") for n in gm.graph.nodes)
    assert torch.allclose(logits(m, BATCHES[1]), before, atol=1e-6)


def test_checkpoint_roundtrip_restores_expert_quantizers(tmp_path):
    m = quantized()
    path = str(tmp_path / "q.pt")
    qpass.save(m, path)
    fresh = tiny_mixtral()
    qpass.restore(fresh, path)
    q = fresh.model.layers[0].mlp.experts.gate_up_proj_weight_quantizers
    assert isinstance(q, ExpertQuantizers) and len(q) == EXPERTS
    assert torch.equal(q[2].amax, m.model.layers[0].mlp.experts.gate_up_proj_weight_quantizers[2].amax)
    assert torch.equal(logits(fresh, BATCHES[1]), logits(m, BATCHES[1]))


def test_layerwise_calibration_matches_whole_model_with_experts():
    whole = quantized()
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "max", "layerwise": True}
    layerwise = quantized(cfg)
    assert torch.equal(logits(whole, BATCHES[1]), logits(layerwise, BATCHES[1]))


@pytest.mark.parametrize("preset", ["INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG"])
def test_algorithms_run_on_models_with_experts(preset):
    """Experts are not smoothing units (no Linear): they keep max calibration, the rest of the model
    gets the algorithm."""
    m = quantized(getattr(qpass, preset))
    ex = m.model.layers[0].mlp.experts
    assert all(q.amax is not None for q in ex.gate_up_proj_weight_quantizers)
    for q in (ex.gate_up_proj_input_quantizer, ex.down_proj_input_quantizer):
        assert not q.is_enabled or (q.is_dynamic or q.amax is not None)
    assert cosine(logits(m), logits(tiny_mixtral())) > 0.98


def _exported(tmp_path, preset: str, **kw):
    """A tiny Mixtral quantized with ``preset`` and exported to ONNX: (model, path, checked graph)."""
    import onnx

    m = tiny_mixtral(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(getattr(qpass, preset)), loop)
        path = qpass.export_onnx(m, str(tmp_path / "moe.onnx"), example_inputs={"input_ids": BATCHES[1]})
    onnx.checker.check_model(path, full_check=True)
    return m, path, onnx.load(path).graph


@pytest.mark.parametrize("preset", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG"])
def test_grouped_experts_export_to_onnx_and_match_in_onnxruntime(tmp_path, preset):
    """The default grouped matmul (transformers::grouped_mm_fallback on the CPU) exports as one
    MatMul per expert over a Slice of its sorted rows; ONNX Runtime gives the fake-quant logits. An
    int8 activation is sliced as codes, so each expert's MatMul reads its own DequantizeLinear."""
    from qpass.export.compare import compare, ort_session

    m, path, graph = _exported(tmp_path, preset)
    producer = {out: n for n in graph.node for out in n.output}

    def reads_rows(mm):  # its activation: a Slice of the sorted rows, or the DequantizeLinear of one
        a = producer.get(mm.input[0])
        if a is not None and a.op_type == "DequantizeLinear":
            a = producer.get(a.input[0])
        return a is not None and a.op_type == "Slice"

    # per layer two grouped matmuls (gate_up, down), one MatMul per expert each
    expert_mms = [n for n in graph.node if n.op_type == "MatMul" and reads_rows(n)]
    assert len(expert_mms) == 2 * 2 * EXPERTS
    if preset == "INT8_DEFAULT_CFG":
        for mm in expert_mms:
            act = producer[mm.input[0]]
            assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "Slice"
    if preset == "NVFP4_DEFAULT_CFG":  # ONNX Runtime's CPU has no DequantizeLinear-23: ONNX's reference evaluator
        import numpy as np
        from onnx.reference import ReferenceEvaluator

        out = ReferenceEvaluator(path).run(None, {graph.input[0].name: BATCHES[2].numpy()})[0]
        want = logits(m, BATCHES[2]).numpy()
        assert float((out * want).sum() / np.linalg.norm(out) / np.linalg.norm(want)) >= 0.9999
        return
    report = compare(m, path, {"input_ids": BATCHES[2]}, session=ort_session(path, threads=1))
    assert report[0]["cosine"] >= 0.9999


@pytest.mark.parametrize("preset,codes", [("INT8_DEFAULT_CFG", "INT8"), ("FP8_DEFAULT_CFG", "FLOAT8E4M3FN")])
def test_batched_experts_export_to_onnx_and_match_in_onnxruntime(tmp_path, preset, codes):
    """batched_mm experts are a gather and a bmm: they export (the experts' weights as one
    low-precision initializer per parameter with its scales, their input quantizers as
    QuantizeLinear/DequantizeLinear) and ONNX Runtime gives the fake-quant model's logits."""
    import onnx

    from qpass.export.compare import compare, ort_session

    m, path, graph = _exported(tmp_path, preset, experts_implementation="batched_mm")
    stored = {i.name: (onnx.TensorProto.DataType.Name(i.data_type), tuple(i.dims)) for i in graph.initializer}
    assert stored["model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.codes"] == (codes, (EXPERTS, 256, 64))
    assert stored["model.layers.1.mlp.experts.down_proj_weight_quantizers.codes"] == (codes, (EXPERTS, 64, 128))
    # no float copy of an expert parameter (float 3-D initializers are the per-row scales only)
    assert all(i.dims[-1] == 1 for i in graph.initializer
               if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 3 and i.dims[0] == EXPERTS)
    producer = {out: n for n in graph.node for out in n.output}
    kinds = lambda n: [producer[i].op_type if i in producer else "input" for i in n.input]  # noqa: E731
    # per layer: q/k/v (one, shared), o_proj and the experts' two inputs (the router gate is off)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 2 * 4
    # each expert matmul multiplies the gathered per-token expert weights by a dequantized activation
    # column (the activation is quantized as [tokens, channels], then unsqueezed)
    expert_mms = [n for n in graph.node if n.op_type == "MatMul" and "GatherND" in kinds(n)]
    assert len(expert_mms) == 2 * 2
    for mm in expert_mms:
        act = next(producer[i] for i in mm.input if i in producer and producer[i].op_type != "GatherND")
        chain = [act.op_type]
        while act.op_type in ("Unsqueeze", "DequantizeLinear"):
            act = producer[act.input[0]]
            chain.append(act.op_type)
        # int8: Q -> Unsqueeze -> DQ -> MatMul (ONNX Runtime's form); FP8: Q -> DQ -> Unsqueeze -> MatMul
        assert chain[:3] in (["DequantizeLinear", "Unsqueeze", "QuantizeLinear"],
                             ["Unsqueeze", "DequantizeLinear", "QuantizeLinear"]), chain
    report = compare(m, path, {"input_ids": BATCHES[2]}, session=ort_session(path, threads=1))
    assert report[0]["cosine"] >= 0.9999


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_moe_calib_experts_ratio_on_fused_experts(impl):
    """ModelOpt 0.47 applies the ratio to sequential experts only (it ignores it for transformers 5's
    fused experts); qpass routes each calibration token to every expert here too. The router's own
    top_k is what the quantized model runs with."""
    def calibrated(ratio):
        m = tiny_mixtral(experts_implementation=impl)
        cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
        cfg["algorithm"] = {"method": "max", "moe_calib_experts_ratio": ratio}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qpass.quantize(m, cfg, loop)
        return m

    plain, wide = calibrated(None), calibrated(1.0)
    amax = lambda m: {n: q.amax for n, q in m.named_modules()  # noqa: E731
                      if isinstance(q, TensorQuantizer) and n.endswith("input_quantizer") and q.amax is not None}
    a, b = amax(plain), amax(wide)
    down = [n for n in a if n.endswith("experts.down_proj_input_quantizer")]
    assert len(down) == 2 and all(b[n] >= a[n] for n in down) and any(b[n] > a[n] for n in down)
    for n in a:  # the routed tokens reach gate_up either way; nothing outside the experts changes
        if not n.endswith("experts.down_proj_input_quantizer"):
            assert torch.equal(a[n], b[n]), n
    assert wide.model.layers[0].mlp.gate.top_k == 2
    for n, q in plain.named_modules():
        if n in b:
            q.amax = b[n]
    assert torch.equal(logits(plain), logits(wide))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_calib_experts_ratio_one_calibrates_the_first_block_as_top_k_all(arch):
    """The first MoE block's inputs do not depend on routing, so with ratio 1.0 its experts' amax
    equal those of the same model built with top_k = num_experts (calibrated without the option)."""
    def build(top_k):
        if arch == "mixtral":
            return tiny_mixtral(top_k=top_k)
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        torch.manual_seed(0)
        cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_experts_per_tok=top_k, intermediate_size=64,
                             moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=EXPERTS)
        return Qwen2MoeForCausalLM(cfg).eval()

    def first_block_amax(top_k, ratio):
        m = build(top_k)
        cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
        cfg["algorithm"] = {"method": "max", "moe_calib_experts_ratio": ratio}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qpass.quantize(m, cfg, loop)
        return {n: q.amax for n, q in m.named_modules()
                if isinstance(q, TensorQuantizer) and ".layers.0.mlp.experts." in n and q.amax is not None}

    wide, all_k = first_block_amax(2, 1.0), first_block_amax(EXPERTS, None)
    assert wide.keys() == all_k.keys() and len(wide) == 2 * (1 + EXPERTS)
    for n in wide:
        assert torch.equal(wide[n], all_k[n]), n


def test_moe_calib_experts_ratio_layer_by_layer_matches_the_whole_model_pass():
    def calibrated(layerwise):
        m = tiny_mixtral()
        cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
        cfg["algorithm"] = {"method": "max", "moe_calib_experts_ratio": 1.0, "layerwise": {"enable": layerwise}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qpass.quantize(m, cfg, loop)
        return {n: q.amax for n, q in m.named_modules() if isinstance(q, TensorQuantizer) and q.amax is not None}

    whole, layered = calibrated(False), calibrated(True)
    assert whole.keys() == layered.keys()
    for n in whole:
        assert torch.equal(whole[n], layered[n]), n


def test_nvfp4_expert_weights_export_as_fp4_with_a_global_scale_per_expert(tmp_path):
    """NVFP4 experts: one FLOAT4E2M1 initializer per expert parameter, its FP8 block scales, and
    a global scale per expert (each expert has its own global amax) dequantizing the block scales
    along the expert axis; ONNX's reference evaluator gives the fake-quant model's logits."""
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    from qpass.graph.trace import fetch_attr
    from qpass.passes.lower import lower_graph

    m = tiny_mixtral(experts_implementation="batched_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(qpass.NVFP4_DEFAULT_CFG), loop)
    experts = m.model.layers[0].mlp.experts
    amax = [q.amax.item() for q in experts.gate_up_proj_weight_quantizers]
    assert len(set(amax)) == EXPERTS  # their own global amax each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = qpass.export_onnx(m, str(tmp_path / "moe.onnx"), example_inputs={"input_ids": BATCHES[1]})
    onnx.checker.check_model(path, full_check=True)
    graph = onnx.load(path).graph
    stored = {i.name: (onnx.TensorProto.DataType.Name(i.data_type), tuple(i.dims)) for i in graph.initializer}
    base = "model.layers.0.mlp.experts.gate_up_proj_weight_quantizers"
    assert stored[f"{base}.codes"] == ("FLOAT4E2M1", (EXPERTS, 256, 64))
    assert stored[f"{base}.block_scale"] == ("FLOAT8E4M3FN", (EXPERTS, 256, 4))
    assert stored[f"{base}.global_scale"] == ("FLOAT", (EXPERTS,))
    assert stored["model.layers.1.mlp.experts.down_proj_weight_quantizers.codes"] == ("FLOAT4E2M1", (EXPERTS, 64, 128))
    # no float copy of an expert parameter
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 3 and i.dims[0] == EXPERTS
                   and i.dims[-1] > 1 for i in graph.initializer)
    scale_dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[1] == f"{base}.global_scale")
    assert next(a.i for a in scale_dq.attribute if a.name == "axis") == 0
    # the lowered graph's stacked codes are the fake-quant weights exactly
    traced = next(iter(qpass.graph.quantized_model.state_of(m).graphs.values()))[0]
    lowered = lower_graph(traced.gm)
    node = next(n for n in lowered.graph.nodes if n.target is torch.ops.qpass.dequantize_nvfp4.default
                and n.args[2].target.startswith(base))
    got = torch.ops.qpass.dequantize_nvfp4(*[fetch_attr(lowered, a.target) if isinstance(a, torch.fx.Node) else a
                                             for a in node.args])
    w = experts.gate_up_proj.detach()
    assert torch.equal(got, experts.gate_up_proj_weight_quantizers(w))
    ev = ReferenceEvaluator(path)
    x = BATCHES[2]
    out = ev.run(None, {graph.input[0].name: x.numpy()})[0]
    want = logits(m, x).numpy()
    cos = float((out * want).sum() / np.linalg.norm(out) / np.linalg.norm(want))
    assert cos > 0.9999


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss])
def test_real_quantize_packs_expert_weights(make, tmp_path):
    """INT4 blocks: each expert's codes two per byte plus its scales; the parameter's FP32 storage is
    released, the outputs equal the fake-quant model's bit for bit, and save/restore and fold_weight
    give them back."""
    from qpass.nn.packed_weight import PackedWeightQuantizer, is_placeholder

    cfg = copy.deepcopy(qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    fake = make()
    qpass.quantize(fake, copy.deepcopy(cfg), loop)
    cfg["algorithm"] = {"method": "real_quantize", "additional_algorithm": "max"}
    real = make()
    qpass.quantize(real, cfg, loop)
    mlp = real.model.layers[0].mlp.experts
    assert is_placeholder(mlp.gate_up_proj) and "gate_up_proj" not in dict(mlp.named_parameters())
    q = getattr(mlp, "gate_up_proj_weight_quantizers", None) or mlp.gate_up_proj_weight_quantizer
    members = list(q) if isinstance(q, ExpertQuantizers) else [q]
    assert all(isinstance(m, PackedWeightQuantizer) for m in members)
    fp32 = mlp.gate_up_proj.numel() * 4
    packed = sum(m.packed_bytes for m in members)
    # 4 of 32 bits per weight, plus one FP32 scale per block: the experts' rows have 64 inputs here, so
    # a block of 128 holds 64 weights (0.125 + 4 / 256 = 0.1406 of the FP32 bytes; 0.133 at 128)
    assert packed == fp32 // 8 + (fp32 // 4 // 64) * 4
    assert torch.equal(logits(real, BATCHES[1]), logits(fake, BATCHES[1]))
    path = str(tmp_path / "real.pt")
    qpass.save(real, path)
    restored = make()
    qpass.restore(restored, path)
    assert is_placeholder(restored.model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(logits(restored, BATCHES[1]), logits(fake, BATCHES[1]))
    qpass.fold_weight(real)
    assert isinstance(mlp.gate_up_proj, torch.nn.Parameter) and not is_placeholder(mlp.gate_up_proj)
    # (GPT-OSS: the folded [E, in, out] weight reaches the matmul in another memory layout)
    torch.testing.assert_close(logits(real, BATCHES[1]), logits(fake, BATCHES[1]), rtol=0, atol=1e-6)


def _auto_quantize(m, method="gradient", bits=4.8, batches=BATCHES):
    kw = {"loss_func": lambda out, x: out.logits.float().pow(2).mean()} if method == "gradient" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qpass.auto_quantize(m, constraints={"effective_bits": bits}, data_loader=batches,
                                   quantization_formats=["INT4_AWQ_CFG", "INT8_DEFAULT_CFG", None],
                                   forward_step=lambda mod, x: mod(x), method=method, **kw)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss])
def test_auto_quantize_searches_each_experts_module_as_one_group(make):
    """As in ModelOpt 0.47, an experts module is one search group (its parameters share the format),
    its weights count in the bits budget, and they are scored like any layer: by the gradient taps
    on the grouped matmul, or by KL divergence."""
    m, sd = _auto_quantize(make())
    stats = sd["candidate_stats"]
    group = stats["model.layers.0.mlp.experts.{gate_up_proj,down_proj}"]
    ex = make().model.layers[0].mlp.experts
    assert group["weights"] == ex.gate_up_proj.numel() + ex.down_proj.numel()
    assert sd["total_weights"] == sum(s["weights"] for s in stats.values())
    int4, int8, none = group["scores"]
    assert int4 > int8 > 0 and none == 0  # the INT4 experts perturb the loss more than INT8
    assert group["costs"][0] < group["costs"][1] < group["costs"][2]
    best = sd["best"]
    assert best["is_satisfied"] and best["effective_bits"] <= 4.8
    # most weights are the experts': a 4.8-bit budget needs them in INT4, and they are
    assert best["recipe"]["model.layers.0.mlp.experts.{gate_up_proj,down_proj}"] == "INT4_AWQ_CFG"
    q = m.model.layers[0].mlp.experts
    weight_q = getattr(q, "gate_up_proj_weight_quantizers", None) or q.gate_up_proj_weight_quantizer
    assert weight_q.is_enabled and "int4" in weight_q.describe()
    kl_model, kl = _auto_quantize(make(), method="kl_div")
    assert kl["best"]["recipe"] == best["recipe"]
    assert torch.equal(logits(kl_model), logits(m))


def test_auto_quantize_gradient_needs_grouped_experts():
    """batched_mm gathers each token's expert weights: no gradient tap can replay that, so the
    gradient method says what to use instead (and the model is left as it was); kl_div works."""
    from qpass.auto_quantize.solver import AutoQuantizeError

    m = tiny_mixtral(experts_implementation="batched_mm")
    ref = logits(m)
    with pytest.raises(AutoQuantizeError, match=r"experts_implementation='batched_mm'\) cannot be scored by "
                                                r"gradient: use method='kl_div'"):
        _auto_quantize(m)
    assert not hasattr(m.model.layers[0].mlp.experts, "gate_up_proj_input_quantizer")
    assert torch.equal(logits(m), ref)
    _, sd = _auto_quantize(m, method="kl_div")
    assert sd["best"]["recipe"]["model.layers.1.mlp.experts.{gate_up_proj,down_proj}"] == "INT4_AWQ_CFG"


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_bfloat16_experts_through_aten_grouped_mm():
    """In bfloat16 transformers runs the experts through torch's own grouped matmul
    (``aten._grouped_mm``, as on GPUs) instead of its fallback op: the same quantizers apply."""
    m = tiny_mixtral().to(torch.bfloat16)
    ref = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)
    gm = next(iter(state_of(m).graphs.values()))[0].gm
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten._grouped_mm.default]
    assert len(mms) == 4  # 2 layers x (gate_up, down)
    assert all(n.args[0].meta.get(QUANTIZER_META, "").endswith("_input_quantizer") for n in mms)
    ex = m.model.layers[1].mlp.experts
    assert ex.down_proj_input_quantizer.amax is not None and ex.down_proj_weight_quantizers[3].amax.shape == (64, 1)
    assert cosine(logits(m).float(), logits(ref).float()) > 0.999


def test_batched_mm_experts_get_the_same_quantizers():
    """experts_implementation='batched_mm' gathers each token's expert weights (``W[expert_ids]``) and
    multiplies them by bmm: the same quantizers, the same amax as the grouped matmul, and that bmm is
    not mistaken for an attention product (the gathered weights are a parameter, not an activation)."""
    grouped = quantized()
    batched = tiny_mixtral(experts_implementation="batched_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(batched, copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)
    names = {n for n, _ in batched.named_modules()}
    assert not any(".experts." in n and "bmm_quantizer" in n for n in names)
    for i in range(2):
        a, b = grouped.model.layers[i].mlp.experts, batched.model.layers[i].mlp.experts
        for slot in ("gate_up_proj_input_quantizer", "down_proj_input_quantizer"):
            torch.testing.assert_close(getattr(b, slot).amax, getattr(a, slot).amax, rtol=1e-6, atol=0)
        for qa, qb in zip(a.down_proj_weight_quantizers, b.down_proj_weight_quantizers):
            assert torch.equal(qa.amax, qb.amax)
    assert cosine(logits(batched), logits(grouped)) > 0.99999


def test_eager_experts_are_refused_with_the_implementation_to_use():
    from qpass.errors import TraceError

    m = tiny_mixtral(experts_implementation="eager")
    ref = logits(m)
    with pytest.raises(TraceError, match=r"module 'model.layers.0.mlp.experts' \(MixtralExperts\) failed .* "
                                         r"experts_implementation='grouped_mm'"):
        qpass.quantize(m, copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)
    assert not hasattr(m.model.layers[0].mlp.experts, "gate_up_proj_input_quantizer")
    assert torch.equal(logits(m), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_bfloat16_experts_on_cuda_match_the_cpu(preset):
    """On a GPU, bfloat16 experts run through torch's grouped matmul kernel: the same quantizers,
    the per-expert weight amax of the CPU run, and outputs close to the CPU's."""
    cpu = tiny_mixtral().to(torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(cpu, copy.deepcopy(getattr(qpass, preset)), loop)
        qpass.quantize(gpu, copy.deepcopy(getattr(qpass, preset)), lambda m: [m(x.cuda()) for x in BATCHES])
    for i in range(2):
        a, b = cpu.model.layers[i].mlp.experts, gpu.model.layers[i].mlp.experts
        for qa, qb in zip(a.gate_up_proj_weight_quantizers, b.gate_up_proj_weight_quantizers):
            assert torch.equal(qa.amax, qb.amax.cpu())
        torch.testing.assert_close(b.down_proj_input_quantizer.amax.cpu(), a.down_proj_input_quantizer.amax,
                                   rtol=0.02, atol=0)
    with torch.no_grad():
        want = cpu(BATCHES[1]).logits.float()
        got = gpu(BATCHES[1].cuda()).logits.float().cpu()
    assert cosine(got, want) > 0.999


def test_granite_moe_takes_use_cache_through_kwargs():
    """GraniteMoE's causal LM takes ``use_cache`` through ``**kwargs`` only: the quantized model still
    runs without a KV cache (a cache object cannot leave the exported graph), and its experts are
    quantized."""
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(0)
    m = GraniteMoeForCausalLM(GraniteMoeConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=EXPERTS, num_experts_per_tok=2)).eval()
    ref = logits(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop)
    ex = m.model.layers[0].block_sparse_moe.experts
    assert all(q.amax is not None for q in ex.gate_up_proj_weight_quantizers)
    assert ex.down_proj_input_quantizer.amax is not None
    assert cosine(logits(m), ref) > 0.999


def test_transposed_batched_experts_export_int4_initializers(tmp_path):
    """GPT-OSS's [E, in, out] experts (one quantizer seeing [E, out, in]): INT4 blocks along the input
    dim become one INT4 initializer per parameter, and ONNX Runtime matches."""
    import onnx

    from qpass.export.compare import compare, ort_session
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    m = GptOssForCausalLM(GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                                       num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2,
                                       experts_implementation="batched_mm")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.quantize(m, copy.deepcopy(qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), loop)
        path = qpass.export_onnx(m, str(tmp_path / "moe.onnx"), example_inputs={"input_ids": BATCHES[1]})
    stored = {i.name: (onnx.TensorProto.DataType.Name(i.data_type), tuple(i.dims)) for i in onnx.load(path).graph.initializer}
    assert stored["model.layers.0.mlp.experts.down_proj_weight_quantizer.codes"] == ("INT4", (EXPERTS, 64, 32))
    report = compare(m, path, {"input_ids": BATCHES[2]}, session=ort_session(path, threads=1))
    assert report[0]["cosine"] >= 0.9999
