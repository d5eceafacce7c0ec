"""qpass.set_weight_cache: eval forwards keep each fake-quantized weight (default) or quantize it anew."""

import copy

import pytest
import torch

import qpass
from qpass.calib.max_calibrate import named_tensor_quantizers
from qpass.errors import QuantConfigError

from conftest import tiny_llama


def _cached(model):
    """Bytes of fake-quant weight copies the model's quantizers hold."""
    return sum(q._weight_cache[2].numel() * q._weight_cache[2].element_size()
               for _, q in named_tensor_quantizers(model) if q._weight_cache is not None)


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
def test_weight_cache_off_keeps_no_copies_and_changes_no_output(config):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = qpass.quantize(tiny_llama(), copy.deepcopy(getattr(qpass, config)), lambda m: m(input_ids=ids))
    weights = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                  if hasattr(m, "weight_quantizer") and m.weight_quantizer.is_enabled)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert _cached(model) == weights  # one copy of every quantized weight
        assert qpass.set_weight_cache(model, False) is model
        assert _cached(model) == 0  # dropped
        out = model(input_ids=ids).logits
        assert _cached(model) == 0 and torch.equal(out, ref)
        qpass.set_weight_cache(model, True)
        assert torch.equal(model(input_ids=ids).logits, ref) and _cached(model) == weights


def test_weight_cache_setting_reaches_quantizers_created_later():
    """A quantizer qpass creates after the call (a later graph reaching a new slot) follows it."""
    from qpass.graph.quantized_model import make_quantizer, state_of

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model = qpass.quantize(tiny_llama(), copy.deepcopy(qpass.INT8_DEFAULT_CFG), lambda m: m(input_ids=ids))
    qpass.set_weight_cache(model, False)
    assert all(not q._cache_weights for _, q in named_tensor_quantizers(model))
    owner = model.get_submodule("model.layers.0.mlp.down_proj")
    q = make_quantizer(model, state_of(model), "model.layers.0.mlp.down_proj", owner, "extra_quantizer")
    assert not q._cache_weights
    qpass.set_weight_cache(model, True)
    assert all(q._cache_weights for _, q in named_tensor_quantizers(model))


def test_weight_cache_flag_must_be_bool():
    model = qpass.quantize(tiny_llama(), copy.deepcopy(qpass.INT8_DEFAULT_CFG),
                           lambda m: m(input_ids=torch.randint(0, 128, (1, 8))))
    with pytest.raises(QuantConfigError, match="enabled must be True or False, got 'no'"):
        qpass.set_weight_cache(model, "no")
