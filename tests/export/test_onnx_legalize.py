"""Graphs torch.onnx re-traces differently: strides after a fused op, mixed-dtype arithmetic.

Before :mod:`qpass.passes.onnx_legalize`, ONNX export of quantized T5, Swin and BEiT failed in
torch.onnx's decomposition ("Cannot view a tensor ..."), and XLNet and BigBird failed there too
("Cannot find a compatible OpOverload for aten.sub"). Their FP32 models fail the same way in
plain ``torch.onnx.export``.
"""

import pytest
import torch
from torch import nn

import qpass
from qpass.passes.onnx_legalize import legalize_for_onnx

pytest.importorskip("onnxruntime")
aten = torch.ops.aten


class _Attention(nn.Module):
    """HF's pattern: sdpa (CPU meta: [b, t, h, d] memory order), transpose, reshape; and 1 - mask."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = (1.0 - mask[:, None, None, :]) * -1e4  # int64 mask, float result
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.reshape(b, self.heads, t, -1).transpose(1, 2).reshape(b, t, -1)
        return self.out(y)


def _inputs(seed=0, b=2, t=8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[0, -2:] = 0
    return torch.randn(b, t, 32, generator=g), mask


def test_legalize_clones_before_reshapes_of_fused_outputs_and_casts_mixed_arithmetic():
    torch.manual_seed(0)
    model = _Attention().eval()
    x, mask = _inputs()
    gm = torch.export.export(model, (x, mask), strict=False).module()
    ref = gm(x, mask)
    sdpa = next(n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert not sdpa.meta["val"].is_contiguous()  # the stride the re-trace and the decomposition disagree on
    counts = legalize_for_onnx(gm)
    assert counts == {"clone": 1, "cast": 1, "unsqueeze": 0}
    clone = next(n for n in gm.graph.nodes if n.target is aten.clone.default)
    assert clone.args[0] is sdpa and clone.kwargs["memory_format"] == torch.contiguous_format
    assert all(u.target in (aten.reshape.default, aten.view.default) for u in clone.users)
    rsub = next(n for n in gm.graph.nodes if n.target in (aten.rsub.Scalar, aten.sub.Tensor, aten.rsub.Tensor)
                and n.meta["val"].dtype == torch.float32)
    cast = next(a for a in rsub.args if isinstance(a, torch.fx.Node) and a.target is aten._to_copy.default)
    assert cast.kwargs["dtype"] == torch.float32 and cast.args[0].meta["val"].dtype == torch.int64
    torch.testing.assert_close(gm(x, mask), ref, rtol=0, atol=0)  # the same values
    assert legalize_for_onnx(gm) == {"clone": 0, "cast": 0, "unsqueeze": 0}  # idempotent


def test_quantized_attention_block_exports_and_matches_in_onnx_runtime(tmp_path):
    """Without the pass this export fails in torch.onnx ("no compatible OpOverload for aten.sub")."""
    from qpass.export.compare import ort_session

    torch.manual_seed(0)
    model = _Attention().eval()
    batches = [_inputs(s) for s in range(3)]
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(*b) for b in batches[1:]])
    path = qpass.export_onnx(model, str(tmp_path / "attn.onnx"), example_inputs=batches[0])
    sess = ort_session(path)
    x, mask = _inputs(seed=5, b=3, t=11)  # other sizes: the dims stay dynamic
    got = torch.from_numpy(sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [x.numpy(), mask.numpy()])))[0])
    with torch.no_grad():
        ref = model(x, mask)
    assert nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0).item() > 0.9999


def _ort_cosine(model, path, inputs: dict, key):
    from qpass.export.compare import ort_session

    sess = ort_session(path)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    got = torch.from_numpy(dict(zip(names, sess.run(None, feed)))[key])
    with torch.no_grad():
        ref = getattr(model(**inputs), key)
    return nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0).item()


def _tiny(name):
    import transformers

    torch.manual_seed(0)
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                    pad_token_id=0, eos_token_id=1)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.XLNetConfig(vocab_size=128, d_model=32, n_layer=2, n_head=4, d_inner=64)
        model = transformers.XLNetModel(cfg)
    return model.eval()


def _batch(name, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    out = dict(input_ids=ids, attention_mask=mask)
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(2, 128, (2, 6), generator=g)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,key", [("t5", "logits"), ("xlnet", "last_hidden_state")])
def test_tiny_hf_models_that_torch_onnx_could_not_decompose_export_and_match(name, key, tmp_path):
    pytest.importorskip("transformers")
    model = _tiny(name)
    batches = [_batch(name, s) for s in range(3)]
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in batches[1:]])
    path = qpass.export_onnx(model, str(tmp_path / f"{name}.onnx"), example_inputs=batches[0])
    assert _ort_cosine(model, path, batches[0], key) > 0.9999
