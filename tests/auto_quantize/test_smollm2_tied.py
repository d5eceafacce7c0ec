"""SmolLM2 ties lm_head to the input embedding: AWQ scales lm_head's weight, and neither
auto_quantize nor plain AWQ may change the shared table (the embedding output stays bit-identical)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import qpass
from conftest import needs_smollm2

pytestmark = [pytest.mark.real_model, needs_smollm2]


def forward_step(model, batch):
    return model(input_ids=batch, use_cache=False)


def loss_func(out, batch):
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def smollm2(one_thread):
    from qpass import zoo

    model, tok = zoo.load_smollm2(2)
    ids = zoo.token_windows(tok, zoo.text_split().calib, 4, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        emb = model.model.embed_tokens(ids).clone()
    return model, ids, emb


def test_auto_quantize_keeps_tied_embedding(smollm2):
    model, ids, emb = smollm2
    model = copy.deepcopy(model)
    # 4.2 bits leaves only W4A8 AWQ, lm_head included: its AWQ-scaled weight needs its own copy.
    model, sd = qpass.auto_quantize(model, {"effective_bits": 4.2}, ["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None],
                                    [ids[:2], ids[2:]], forward_step, loss_func,
                                    num_calib_steps=2, num_score_steps=2)
    assert sd["best"]["recipe"]["lm_head"] == "W4A8_AWQ_BETA_CFG"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), emb)
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_awq_keeps_tied_embedding(smollm2):
    model, ids, emb = smollm2
    model = copy.deepcopy(model)
    cfg = copy.deepcopy(qpass.INT4_AWQ_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": True})
    qpass.quantize(model, cfg, lambda m: forward_step(m, ids))
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), emb)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # lm_head was scaled
