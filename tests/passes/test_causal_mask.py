"""Causal-mask recovery: SDPA gets is_causal=True back where the traced graph builds the causal
mask from sizes alone, and keeps its mask everywhere else."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass
from qpass.graph.quantized_model import state_of
from qpass.passes.causal_mask import recover_causal_masks

from conftest import tiny_llama

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_nodes(model):
    return [n for ts in state_of(model).graphs.values() for t in ts for n in t.gm.graph.nodes
            if n.op == "call_function" and n.target is SDPA]


def _has_mask(node) -> bool:
    return len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None


def _quantize_llama(model, batches):
    qpass.quantize(model, copy.deepcopy(qpass.INT8_DEFAULT_CFG),
                   lambda m: [m(input_ids=b, use_cache=False) for b in batches])
    qpass.disable_quantizer(model, "*")  # the graph alone, against the eager model
    return model


def test_llama_attention_is_causal_and_equals_eager():
    ref = tiny_llama(layers=3)
    model = _quantize_llama(copy.deepcopy(ref), [torch.randint(0, 128, (2, 24))])
    nodes = _sdpa_nodes(model)
    assert len(nodes) == 3
    for n in nodes:
        assert n.kwargs.get("is_causal") is True and not _has_mask(n), n.format_node()
    (gm,) = [t.gm for ts in state_of(model).graphs.values() for t in ts]
    # the mask's code is gone: no boolean [b, 1, s, s] tensor is built any more
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        assert not (isinstance(val, torch.Tensor) and val.dtype is torch.bool and val.dim() == 4), n.format_node()
    with torch.no_grad():
        for length in (5, 24, 77):  # other lengths than the traced one
            x = torch.randint(0, 128, (3, length))
            torch.testing.assert_close(model(input_ids=x, use_cache=False).logits,
                                       ref(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-6)


def test_padding_mask_is_kept():
    ref = tiny_llama(layers=2)
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    qpass.quantize(model, copy.deepcopy(qpass.INT8_DEFAULT_CFG),
                   lambda m: m(input_ids=ids, attention_mask=mask, use_cache=False))
    nodes = _sdpa_nodes(model)
    assert nodes and all(_has_mask(n) and not n.kwargs.get("is_causal") for n in nodes)
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   ref(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [6, 4096])
def test_sliding_window_mask_is_kept(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                        sliding_window=window)
    ref = MistralForCausalLM(cfg).eval()
    model = _quantize_llama(copy.deepcopy(ref), [torch.randint(0, 128, (2, 20))])
    nodes = _sdpa_nodes(model)
    # a window of 6 shows when the mask is evaluated at 17 tokens; one of 4096 is a constant of
    # the mask's code beyond the lengths evaluated, so the mask is never judged causal
    assert nodes and all(_has_mask(n) and not n.kwargs.get("is_causal") for n in nodes)
    with torch.no_grad():
        x = torch.randint(0, 128, (2, 30))
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits,
                                   ref(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-6)


class _MaskFromSizes(nn.Module):
    """Attention whose mask is built from the sequence length: ``kind`` picks which mask."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)
        if self.kind == "causal":
            mask = i[None, :] <= i[:, None]
        elif self.kind == "anti":  # the upper triangle: not causal
            mask = i[None, :] >= i[:, None]
        elif self.kind == "float":  # an additive mask: left alone
            mask = torch.zeros(s, s, device=x.device).masked_fill(i[None, :] > i[:, None], float("-inf"))
        else:  # reads the input's values: not computed from sizes alone
            mask = (i[None, :] <= i[:, None]) & (x[0, :, :1] > -100)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("kind,rewritten", [("causal", True), ("anti", False), ("float", False), ("data", False)])
def test_only_size_built_causal_masks_are_rewritten(kind, rewritten):
    torch.manual_seed(0)
    ref = _MaskFromSizes(kind).eval()
    model = copy.deepcopy(ref)
    qpass.quantize(model, copy.deepcopy(qpass.INT8_DEFAULT_CFG), lambda m: m(torch.randn(2, 9, 16)))
    (node,) = _sdpa_nodes(model)
    assert (node.kwargs.get("is_causal") is True and not _has_mask(node)) is rewritten, node.format_node()
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        x = torch.randn(3, 13, 16)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_pass_on_a_plain_export_counts_rewrites():
    torch.manual_seed(0)
    m = _MaskFromSizes("causal").eval()
    dim = torch.export.Dim.AUTO
    gm = torch.export.export(m, (torch.randn(2, 9, 16),), dynamic_shapes=({0: dim, 1: dim},), strict=False).module()
    assert recover_causal_masks(gm.graph) == 1
    assert recover_causal_masks(gm.graph) == 0  # nothing left to rewrite
    gm.graph.eliminate_dead_code()
    gm.recompile()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=1e-6)


def test_generate_scores_equal_eager():
    """Generation (which re-runs the prefix each step, no KV cache) goes through causal graphs
    and scores every step as the eager model does."""
    ref = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 12))
    model = _quantize_llama(copy.deepcopy(ref), [ids])
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
        want = ref.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(n.kwargs.get("is_causal") is True for n in _sdpa_nodes(model))


def test_encoder_without_attention_mask_drops_its_all_true_mask():
    """HF BERT called without an attention mask builds an all-True mask under tracing: it goes,
    attention stays non-causal; with a padding mask the mask stays."""
    from conftest import tiny_bert

    ref = tiny_bert()
    model = copy.deepcopy(ref)
    qpass.quantize(model, copy.deepcopy(qpass.INT8_DEFAULT_CFG), lambda m: m(input_ids=torch.randint(0, 128, (2, 12))))
    nodes = _sdpa_nodes(model)
    assert nodes and all(not _has_mask(n) and not n.kwargs.get("is_causal") for n in nodes)
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        x = torch.randint(0, 128, (3, 19))
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, ref(input_ids=x).last_hidden_state,
                                   rtol=0, atol=1e-6)

    padded = copy.deepcopy(ref)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    qpass.quantize(padded, copy.deepcopy(qpass.INT8_DEFAULT_CFG),
                   lambda m: m(input_ids=torch.randint(0, 128, (2, 12)), attention_mask=mask))
    assert all(_has_mask(n) for n in _sdpa_nodes(padded))


_ARCHS = {  # name: (config class, model class, extra config, SDPA calls expected causal)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2), True),
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0), False),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256), True),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_kv_heads=2, new_decoder_architecture=True), True),
}


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_other_decoders(arch):
    """Other HF decoders: causal where their mask is, masked where a sliding window is, and the
    unquantized graph equals the eager model bit for bit at lengths the trace did not see."""
    import transformers

    config_cls, model_cls, extra, causal = _ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, **extra)
    cfg._attn_implementation = "sdpa"
    ref = getattr(transformers, model_cls)(cfg).eval()
    model = _quantize_llama(copy.deepcopy(ref), [torch.randint(0, 128, (2, 20))])
    nodes = _sdpa_nodes(model)
    assert len(nodes) == 2
    assert all((n.kwargs.get("is_causal") is True and not _has_mask(n)) is causal for n in nodes)
    with torch.no_grad():
        for length in (7, 33):
            x = torch.randint(0, 128, (2, length))
            assert torch.equal(model(input_ids=x, use_cache=False).logits, ref(input_ids=x, use_cache=False).logits)
