"""Same inputs and seed: bit-identical amax, saved files (qpass.save) and ONNX (qpass.export_onnx)."""

import copy
import io

import pytest
import torch

import qpass
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import tiny_bert


def _run(config, tmp_path, tag):
    model = tiny_bert(layers=1)
    torch.manual_seed(1)
    batches = [dict(input_ids=torch.randint(0, 128, (b, s)), attention_mask=torch.ones(b, s, dtype=torch.long))
               for b, s in ((2, 9), (3, 12))]
    qpass.quantize(model, config, lambda m: [m(**b) for b in batches])
    amax = {n: q.amax.clone() for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.amax is not None}
    buf = io.BytesIO()
    qpass.save(model, buf)
    onnx = tmp_path / f"{tag}.onnx"
    qpass.export_onnx(model, onnx)
    return amax, buf.getvalue(), onnx.read_bytes()


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG"])
def test_quantize_save_export_are_bit_identical(config, tmp_path):
    a1, s1, o1 = _run(config, tmp_path, "a")
    a2, s2, o2 = _run(config, tmp_path, "b")
    assert a1.keys() == a2.keys() and a1
    for n in a1:
        assert torch.equal(a1[n], a2[n]), n
    assert s1 == s2
    assert o1 == o2


def test_save_restore_save_is_bit_identical(tmp_path):
    model = tiny_bert(layers=1)
    ids = torch.randint(0, 128, (2, 6))
    qpass.quantize(model, "INT8_DEFAULT_CFG", lambda m: m(input_ids=ids))
    first = io.BytesIO()
    qpass.save(model, first)
    fresh = tiny_bert(layers=1)
    qpass.restore(fresh, io.BytesIO(first.getvalue()))
    second = io.BytesIO()
    qpass.save(fresh, second)
    assert first.getvalue() == second.getvalue()
    assert torch.equal(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
