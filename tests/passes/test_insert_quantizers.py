"""The insertion pass, asserted by counting quantizer nodes per slot (PT2E style)."""

from collections import Counter

import pytest
import torch

import qpass
from qpass.graph.quantized_model import state_of
from qpass.passes.insert_quantizers import QUANTIZER_META, SLOT_META, quantizer_nodes

from conftest import ExplicitAttention, tiny_bert


def _graphs(model):
    return [t.gm for ts in state_of(model).graphs.values() for t in ts]


def _slot_counts(model):
    (gm,) = _graphs(model)
    return Counter(n.meta[SLOT_META] for n in quantizer_nodes(gm))


def test_linear_and_sdpa_slots(attention):
    qpass.quantize(attention, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 5, 32)))
    assert _slot_counts(attention) == Counter({
        "input_quantizer": 4, "weight_quantizer": 4, "output_quantizer": 4,
        "q_bmm_quantizer": 1, "k_bmm_quantizer": 1, "v_bmm_quantizer": 1,
    })
    # Attention slots live on the module that owns the SDPA op, disabled unless configured.
    assert not attention.q_bmm_quantizer.is_enabled
    assert not attention.softmax_quantizer.is_enabled if hasattr(attention, "softmax_quantizer") else True


def test_kv_cache_config_enables_bmm_quantizers(attention):
    cfg = {"quant_cfg": qpass.FP8_DEFAULT_CFG["quant_cfg"] + qpass.FP8_KV_CFG["quant_cfg"], "algorithm": "max"}
    qpass.quantize(attention, cfg, lambda m: m(torch.randn(2, 5, 32)))
    assert attention.k_bmm_quantizer.is_enabled and attention.v_bmm_quantizer.is_enabled
    assert not attention.q_bmm_quantizer.is_enabled
    assert attention.k_bmm_quantizer.amax is not None


def test_explicit_attention_matmuls():
    torch.manual_seed(0)
    model = ExplicitAttention().eval()
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 5, 32)))
    counts = _slot_counts(model)
    assert counts["q_bmm_quantizer"] == counts["k_bmm_quantizer"] == 1
    assert counts["softmax_quantizer"] == counts["v_bmm_quantizer"] == 1
    (gm,) = _graphs(model)
    (probs,) = [n for n in quantizer_nodes(gm) if n.meta[SLOT_META] == "softmax_quantizer"]
    assert "softmax" in str(probs.args[0].target)


def test_conv_and_conv_transpose(cnn):
    qpass.quantize(cnn, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 3, 8, 8)))
    counts = _slot_counts(cnn)
    # stem, block.conv1, block.conv2, up (ConvTranspose2d), head (Linear)
    assert counts == Counter({"input_quantizer": 5, "weight_quantizer": 5, "output_quantizer": 5})
    assert cnn.up.weight_quantizer.amax.shape[0] == cnn.up.weight.shape[0]


def test_modelopt_rules_on_cnn(cnn):
    qpass.quantize(cnn, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 3, 8, 8)), rules="modelopt")
    (gm,) = _graphs(cnn)
    placed = {n.meta[QUANTIZER_META] for n in quantizer_nodes(gm)}
    assert {"block.bn1.input_quantizer", "pool.input_quantizer"} <= placed
    # The presets disable BatchNorm quantizers by parent_class, as ModelOpt's do.
    assert not cnn.block.bn1.input_quantizer.is_enabled
    assert cnn.pool.input_quantizer.is_enabled


def test_unused_pooler_is_dead_code_before_matching():
    model = tiny_bert()

    class EncoderOnly(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    wrapper = EncoderOnly(model).eval()
    ids = torch.randint(0, 128, (2, 7))
    qpass.quantize(wrapper, qpass.INT8_DEFAULT_CFG, lambda m: m(ids))
    (gm,) = _graphs(wrapper)
    placed = {n.meta[QUANTIZER_META] for n in quantizer_nodes(gm)}
    assert not any("pooler" in p for p in placed)
    assert not any("tanh" in str(n.target) for n in gm.graph.nodes)


class _TransposedLinear(torch.nn.Linear):
    """HF Falcon's FalconLinear: the weight multiplied transposed in the module's own forward."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class _EinsumLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.einsum("bsi,oi->bso", x, self.weight)


def _mlp(cls):
    torch.manual_seed(0)
    return torch.nn.Sequential(cls(16, 32), torch.nn.GELU(), cls(32, 8, bias=False)).eval()


def test_linear_multiplying_its_transposed_weight_is_quantized_as_a_linear():
    xs = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, custom = _mlp(torch.nn.Linear), _mlp(_TransposedLinear)
    custom.load_state_dict(plain.state_dict())
    for m in (plain, custom):
        qpass.quantize(m, qpass.INT8_DEFAULT_CFG, lambda mm: [mm(x) for x in xs[1:]])
    (gm,) = _graphs(custom)
    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert ops["aten.linear.default"] == 2 and ops["aten.matmul.default"] == 0  # the bias add folded in too
    assert _slot_counts(custom) == _slot_counts(plain)
    for (name, q), (_, q_ref) in zip(custom.named_modules(), plain.named_modules()):
        if isinstance(q, qpass.TensorQuantizer) and q.is_enabled:
            torch.testing.assert_close(q.amax, q_ref.amax, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(custom(xs[0]), plain(xs[0]), rtol=0, atol=0)


def test_weight_read_by_an_unmatched_op_is_named_in_a_warning():
    import warnings

    model = _mlp(_EinsumLinear)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 5, 16)))
    texts = [str(w.message) for w in caught if "no qpass rule matches" in str(w.message)]
    assert len(texts) == 2 and "'0' (_EinsumLinear)" in texts[0] and "'2' (_EinsumLinear)" in texts[1]
    assert "einsum" in texts[0] or "bmm" in texts[0] or "mm" in texts[0]

    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 4, 3))
    net = torch.nn.Sequential(conv).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qpass.quantize(net, qpass.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 4, 9)))
    texts = [str(w.message) for w in caught if "no qpass rule matches" in str(w.message)]
    assert len(texts) == 1 and "remove_parametrizations" in texts[0] and "'0'" in texts[0]


class _ScaledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


class _ChannelsFirstNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(32, 16), _ScaledEmbedding(32, 16)
        self.norm, self.cf_norm = torch.nn.LayerNorm(16), _ChannelsFirstNorm(16)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, ids):
        h = self.norm(self.emb(ids) + self.pos(ids))
        return self.fc(self.cf_norm(h.transpose(1, 2)).transpose(1, 2))


@pytest.mark.modelopt
def test_modelopt_rules_skip_subclasses_with_their_own_forward():
    """ModelOpt's registry takes a subclass of Embedding/LayerNorm only if it keeps the base
    forward; rules="modelopt" matches it (names, and so outputs)."""
    import copy
    import warnings

    mtq = pytest.importorskip("modelopt.torch.quantization")
    torch.manual_seed(0)
    base = _Net().eval()
    ids = [torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours = qpass.quantize(copy.deepcopy(base), qpass.INT8_DEFAULT_CFG, lambda m: [m(x) for x in ids[1:]],
                          rules="modelopt")
    theirs = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(theirs, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: [m(x) for x in ids[1:]])

    def names(m):
        return {n for n, q in m.named_modules() if n.endswith("_quantizer")}

    assert names(ours) == names(theirs)
    assert not any(n.startswith(("pos.", "cf_norm.")) for n in names(ours))
    assert {"emb.weight_quantizer", "norm.input_quantizer"} <= names(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[0]), theirs(ids[0]), rtol=1e-5, atol=1e-5)
