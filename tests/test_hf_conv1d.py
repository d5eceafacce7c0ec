"""HF Conv1D (GPT-2): quantized as a Linear with an [out, in] weight, as ModelOpt does."""

import copy
import io
import warnings

import pytest
import torch

import qpass
from qpass.errors import QpassError


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(3)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_conv1d_layers_are_quantized_as_linears():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    xs = _batches()
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight.detach().clone()  # [in, out]
    with torch.no_grad():
        ref = model(xs[0], use_cache=False).logits
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(x, use_cache=False) for x in xs[1:]])
    assert isinstance(c_attn, Conv1D) and isinstance(c_attn, torch.nn.Linear)
    assert torch.equal(c_attn.weight, weight.t())  # [out, in], as ModelOpt stores it
    assert c_attn.weight_quantizer.amax.shape == (96, 1)  # one amax per output channel
    assert c_attn.input_quantizer.amax is not None
    with torch.no_grad():
        out = model(xs[0], use_cache=False).logits
    assert not torch.equal(out, ref) and _cos(out, ref) > 0.999
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        torch.testing.assert_close(model(xs[0], use_cache=False).logits, ref, rtol=1e-5, atol=1e-5)


def test_failed_quantize_gives_conv1d_layers_back():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight
    x = _batches()[0]
    with torch.no_grad():
        ref = model(x, use_cache=False).logits

    def broken(m):
        m(x, use_cache=False)
        raise RuntimeError("data ran out")

    with pytest.raises(RuntimeError, match="data ran out"):
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, broken)
    assert type(c_attn) is Conv1D and c_attn.weight is weight and "in_features" not in c_attn.__dict__
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, ref)


def test_conv1d_round_trip_and_refused_restore():
    xs = _batches()
    model = _gpt2()
    qpass.quantize(model, qpass.FP8_DEFAULT_CFG, lambda m: [m(x, use_cache=False) for x in xs[1:]])
    buf = io.BytesIO()
    qpass.save(model, buf)
    fresh = qpass.restore(_gpt2(), io.BytesIO(buf.getvalue()))
    with torch.no_grad():
        assert torch.equal(fresh(xs[0], use_cache=False).logits, model(xs[0], use_cache=False).logits)
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)).eval()
    weight = other.transformer.h[0].attn.c_attn.weight
    with pytest.raises(QpassError):
        qpass.restore(other, io.BytesIO(buf.getvalue()))
    assert type(other.transformer.h[0].attn.c_attn) is Conv1D and other.transformer.h[0].attn.c_attn.weight is weight


@pytest.mark.modelopt
def test_conv1d_matches_modelopt(tmp_path):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    mto = pytest.importorskip("modelopt.torch.opt")
    xs = _batches()
    reference = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(reference, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: [m(x, use_cache=False) for x in xs[1:]])
        mto.save(reference, tmp_path / "gpt2.pth")
    ours = qpass.quantize(_gpt2(), copy.deepcopy(qpass.INT8_DEFAULT_CFG),
                          lambda m: [m(x, use_cache=False) for x in xs[1:]], rules="modelopt")
    restored = qpass.restore_modelopt(_gpt2(), tmp_path / "gpt2.pth")

    def quantizers(m):
        return {n: q for n, q in m.named_modules() if n.endswith(("input_quantizer", "weight_quantizer"))
                and ".c_" in n}

    theirs, mine = quantizers(reference), quantizers(ours)
    assert set(theirs) == set(mine) and len(mine) == 16
    for name, q in mine.items():
        assert q.is_enabled == theirs[name].is_enabled
        if q.is_enabled:
            torch.testing.assert_close(q.amax, theirs[name].amax, rtol=1e-6, atol=0, msg=name)
    with torch.no_grad():
        want = reference(xs[0], use_cache=False).logits
        assert _cos(ours(xs[0], use_cache=False).logits, want) > 0.9999
        assert _cos(restored(xs[0], use_cache=False).logits, want) > 0.9999


def test_auto_quantize_on_conv1d_layers_and_its_refusal():
    """auto_quantize calibrates its candidates on a copy: the copy and the model must agree on the
    weight layout (SmoothQuant scales the weights), and a refused search gives the layers back."""
    from transformers.pytorch_utils import Conv1D

    xs = _batches()
    kwargs = dict(quantization_formats=["INT8_SMOOTHQUANT_CFG", None], data_loader=xs,
                  forward_step=lambda m, b: m(b, use_cache=False), method="kl_div",
                  num_calib_steps=2, num_score_steps=2)
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpass.auto_quantize(model, constraints={"effective_bits": 12.0}, **kwargs)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, torch.nn.Linear) and c_attn.weight.shape == (96, 32)
    assert any(q.is_enabled for n, q in model.named_modules() if n.endswith(".c_attn.weight_quantizer"))

    model = _gpt2()
    weight = model.transformer.h[0].attn.c_attn.weight
    with pytest.raises(Exception, match="effective bits cannot be met"):
        qpass.auto_quantize(model, constraints={"effective_bits": 2.0}, **kwargs)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and model.transformer.h[0].attn.c_attn.weight is weight
