"""Calibration forwards defer what only the outputs need (qpass.graph.lazy_outputs): the tail
runs when an output is read, or at the end of the pass for outputs still held, and never for
outputs that were dropped. Calibration results are the same either way."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import qpass
from qpass.graph import lazy_outputs
from qpass.graph.lazy_outputs import LazyOutput
from qpass.graph.quantized_model import state_of

from conftest import tiny_llama


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        e = self.emb(ids)
        h = torch.relu(self.fc(e))
        return {"emb": e, "hidden": h, "probs": self.head(h).softmax(-1)}


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (2, 7 + i), generator=g) for i in range(n)]


def _cfg():
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*head*", "enable": False})
    return cfg


def _amax(model):
    return {n: m.amax.clone() for n, m in model.named_modules() if getattr(m, "amax", None) is not None}


def test_dropped_outputs_skip_the_tail_and_calibrate_identically(monkeypatch):
    torch.manual_seed(0)
    base = Head()
    batches = _batches()
    read = []
    tails = []
    result, split_for = lazy_outputs._Pending.result, lazy_outputs.split_for
    monkeypatch.setattr(lazy_outputs._Pending, "result", lambda job: tails.append(job) or result(job))
    splits = []
    monkeypatch.setattr(lazy_outputs, "split_for", lambda exe: splits.append(split_for(exe)) or splits[-1])

    def reading(m):
        for b in batches:
            read.append(m(b)["probs"].sum().item())

    def dropping(m):
        for b in batches:
            m(b)

    runs, models = {}, {}
    for name, loop in (("reading", reading), ("dropping", dropping)):
        tails.clear()
        models[name] = qpass.quantize(copy.deepcopy(base), _cfg(), loop)
        runs[name] = len({id(j) for j in tails})
    assert runs == {"reading": len(batches), "dropping": 0}
    assert [round(r, 3) for r in read] == [float(b.numel()) for b in batches]  # softmax rows sum to 1
    want, got = _amax(models["reading"]), _amax(models["dropping"])
    assert want.keys() == got.keys() and "fc.input_quantizer" in want
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # what was deferred: everything after fc's input quantizer (the only one collecting)
    ops = lambda gm: [n.target.overloadpacket.__name__ for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert ops(splits[-1].tail) == ["linear", "relu", "linear", "softmax"]
    assert "linear" not in ops(splits[-1].head)


def test_held_outputs_keep_the_values_of_the_call():
    """Outputs kept past the pass are computed when it ends: unquantized calibration-time values
    (SmoothQuant rescales the weights afterwards, and the outputs do not see it)."""
    model = tiny_llama(layers=2)
    ref_model = copy.deepcopy(model)
    batches = [torch.randint(0, 128, (2, 9 + i)) for i in range(2)]
    kept = []

    def loop(m):
        for b in batches:
            kept.append(m(input_ids=b))

    qpass.quantize(model, copy.deepcopy(qpass.INT8_SMOOTHQUANT_CFG), loop)
    assert isinstance(kept[0].logits, LazyOutput)
    assert kept[0].logits.shape == (2, 9, 128) and kept[1].logits.shape == (2, 10, 128)
    with torch.no_grad():
        for out, b in zip(kept, batches):
            assert torch.equal(out.logits + 0, ref_model(input_ids=b, use_cache=False).logits)
    assert state_of(model).deferred is None  # the pass is over


def test_lazy_outputs_behave_as_tensors():
    torch.manual_seed(0)
    base = Head()
    with torch.no_grad():
        want = [base(b)["probs"] for b in _batches()]
    outs = []
    qpass.quantize(copy.deepcopy(base), _cfg(), lambda m: outs.extend(m(b) for b in _batches()))
    out = outs[0]
    assert type(out["emb"]) is torch.Tensor  # computed by the head (fc's input quantizer reads it)
    assert isinstance(out["hidden"], LazyOutput)
    p = out["probs"]
    assert isinstance(p, LazyOutput) and p.shape == want[0].shape and p.dtype == want[0].dtype
    assert torch.equal(p.materialize(), want[0])
    assert torch.equal(torch.cat([p, want[0]]), torch.cat([want[0], want[0]]))
    assert (p.numpy() == want[0].numpy()).all()
    assert p.tolist() == want[0].tolist()
    assert repr(p) == repr(want[0])
    assert torch.equal(pickle.loads(pickle.dumps(p)), want[0])
    assert torch.equal(copy.deepcopy(p), want[0])
    buf = io.BytesIO()
    torch.save(outs[1]["probs"], buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), want[1])


def test_a_forward_step_calling_the_model_twice_per_batch():
    torch.manual_seed(0)
    base = Head()
    sums = []

    def loop(m):
        for b in _batches():
            sums.append(m(b)["probs"].sum())
            m(b[:, :3])

    plain = qpass.quantize(copy.deepcopy(base), _cfg(), lambda m: [m(b) for b in _batches()] + [m(b[:, :3]) for b in _batches()])
    twice = qpass.quantize(copy.deepcopy(base), _cfg(), loop)
    assert all(torch.isfinite(s) for s in sums)
    want, got = _amax(plain), _amax(twice)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_outside_calibration_outputs_are_plain():
    torch.manual_seed(0)
    model = qpass.quantize(Head(), _cfg(), lambda m: [m(b) for b in _batches()])
    out = model(_batches()[0])
    assert type(out["probs"]) is torch.Tensor


@pytest.mark.parametrize("algorithm", ["gptq", "smoothquant", "awq_lite"])
def test_algorithms_give_the_same_model_whether_outputs_are_read(algorithm):
    cfg = copy.deepcopy(qpass.INT4_AWQ_CFG if algorithm != "smoothquant" else qpass.INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = algorithm
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    models = []
    for read in (False, True):
        def loop(m):
            for b in batches:
                out = m(input_ids=b)
                if read:
                    out.logits.sum().item()
        models.append(qpass.quantize(tiny_llama(layers=2), copy.deepcopy(cfg), loop))
    a, b = models[0].state_dict(), models[1].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_generate_and_a_loss_inside_the_forward_loop():
    """HF generate reads each step's logits (computed on read); a loss output stays lazy until
    used, and holds the unquantized calibration-time value."""
    model = tiny_llama(layers=2)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 6))
    got = {}

    def loop(m):
        got["tokens"] = m.generate(ids, max_new_tokens=4, do_sample=False)
        out = m(input_ids=ids, labels=ids)
        got["loss"], got["argmax"] = out.loss, out.logits.argmax(-1)

    qpass.quantize(model, copy.deepcopy(qpass.INT8_SMOOTHQUANT_CFG), loop)
    with torch.no_grad():
        want_tokens = ref.generate(ids, max_new_tokens=4, do_sample=False)
        want = ref(input_ids=ids, labels=ids, use_cache=False)
    assert isinstance(got["loss"], LazyOutput) and got["loss"].shape == ()
    assert torch.equal(got["tokens"], want_tokens)
    assert torch.allclose(got["loss"], want.loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(got["argmax"], want.logits.argmax(-1))
