"""CUDA-graph replay of inference forwards (qpass.graph.cuda_graphs).

The policy (when to capture, replay, drop and refuse) runs on the CPU with a stand-in for the
CUDA graph that re-runs the execution graph into the static outputs, as a replay would; the
real capture is checked under ``pytest -m cuda`` (tests/test_cuda.py)."""

import copy

import pytest
import torch

import qpass
from qpass.graph import cuda_graphs
from qpass.graph.quantized_model import graph_for, state_of
from qpass.graph.execution import execution_graph

from conftest import tiny_llama


class _FakeGraph:
    def __init__(self, exe, inputs, outputs):
        self.exe, self.inputs, self.outputs, self.replays = exe, inputs, outputs, 0

    def replay(self):
        flat = torch.utils._pytree.tree_flatten(self.exe(*self.inputs))[0]
        for dst, src in zip(self.outputs, flat):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.replays += 1


@pytest.fixture
def fake_capture(monkeypatch):
    captures = []

    def capture(model, exe, tensors):
        cap = cuda_graphs._Captured()
        static = [t.clone() for t in tensors]
        flat, spec = torch.utils._pytree.tree_flatten(exe(*static))
        cap.graph, cap.exe, cap.inputs = _FakeGraph(exe, static, flat), exe, static
        cap.outputs, cap.out_spec = flat, spec
        cap.epoch, cap.registrations = cuda_graphs.quantizer_epoch(), cuda_graphs._Registrations.value
        cap.tracked = cuda_graphs._tracked(model, exe)
        captures.append(cap)
        return cap

    monkeypatch.setattr(cuda_graphs, "_capture", capture)
    return captures


def _quantized():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    return model.eval(), ids


@torch.no_grad()
def _call(model, ids):
    """One forward through the CUDA-graph policy (eligibility needs CUDA; the policy does not)."""
    state = state_of(model)
    traced, tensors = graph_for(model, (), {"input_ids": ids, "use_cache": False})
    return cuda_graphs.run(model, state.cuda_graphs, traced.gm, execution_graph(traced.gm), tensors)


def test_second_call_captures_then_replays_with_the_eager_result(fake_capture):
    model, ids = _quantized()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    graphs = state_of(model).cuda_graphs
    out1 = _call(model, ids).logits  # eager
    assert not fake_capture and not graphs.graphs
    out2 = _call(model, ids).logits  # captured and replayed
    assert len(fake_capture) == 1 and graphs.replays == 1
    other = torch.randint(0, 128, (2, 16))
    out3 = _call(model, other).logits  # replayed on new values: static inputs are refreshed
    assert graphs.replays == 2
    for out in (out1, out2):
        assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(out3, model(input_ids=other).logits)
    assert torch.equal(out2, ref)  # the earlier result was cloned out of the graph's outputs


@pytest.mark.parametrize("change", ["weight_inplace", "weight_rebound", "disable_quantizer", "amax_inplace", "amax_set"])
def test_a_changed_model_drops_the_graph_and_runs_eagerly(fake_capture, change):
    model, ids = _quantized()
    graphs = state_of(model).cuda_graphs
    _call(model, ids)
    _call(model, ids)
    assert len(graphs.graphs) == 1
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        if change == "weight_inplace":
            lin.weight.mul_(0.5)
        elif change == "weight_rebound":
            lin.weight = torch.nn.Parameter(lin.weight.detach() * 0.5)
        elif change == "disable_quantizer":
            qpass.disable_quantizer(model, "*down_proj.input_quantizer")
        elif change == "amax_inplace":
            lin.input_quantizer._amax.mul_(0.5)
        else:
            lin.input_quantizer.amax = lin.input_quantizer.amax * 0.5
    out = _call(model, ids).logits
    assert not graphs.graphs  # dropped
    state_of(model).cuda_graphs.enabled = False
    with torch.no_grad():
        assert torch.equal(out, model(input_ids=ids).logits)
    state_of(model).cuda_graphs.enabled = True
    _call(model, ids)  # captured again
    assert len(graphs.graphs) == 1 and len(fake_capture) == 2



def test_only_registrations_into_the_model_drop_its_graphs(fake_capture):
    """A new submodule or buffer in the model drops its graphs; registrations elsewhere (another
    model's forward: HF's Llama slices its ModuleList on every call) do not."""
    model, ids = _quantized()
    graphs = state_of(model).cuda_graphs
    _call(model, ids)
    _call(model, ids)
    other = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    other[:2]  # registers two modules into a new ModuleList
    other.register_buffer("extra", torch.zeros(1))
    _call(model, ids)
    assert len(graphs.graphs) == 1 and graphs.replays == 2
    model.model.layers[0].mlp.register_buffer("extra", torch.zeros(1))
    _call(model, ids)
    assert not graphs.graphs


def test_registration_hooks_do_not_make_dynamo_recompile():
    """qpass's registration hooks are global: a compiled model whose forward registers modules
    (a ModuleList slice) must not get a guard on qpass's counter and recompile on every call."""

    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers[:2]:
                x = layer(x)
            return x

    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(Sliced(), backend=backend)
    x = torch.randn(2, 4)
    for _ in range(5):
        fn(x)
    assert len(compiles) == 1
    torch._dynamo.reset()

def test_signature_invalidated_too_often_is_refused(fake_capture):
    model, ids = _quantized()
    graphs = state_of(model).cuda_graphs
    w = model.model.layers[0].mlp.down_proj.weight
    for _ in range(2 * cuda_graphs.MAX_RECAPTURES + 2):
        _call(model, ids)
        with torch.no_grad():
            w.mul_(1.0)
    assert any("invalidated" in r for r in graphs.refused.values())
    n = len(fake_capture)
    _call(model, ids)
    _call(model, ids)
    assert len(fake_capture) == n


def test_hooked_quantizer_stays_eager_until_its_hooks_are_gone(fake_capture):
    model, ids = _quantized()
    seen = []
    handle = model.model.layers[0].mlp.down_proj.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(1))
    for _ in range(3):
        _call(model, ids)
    assert not fake_capture and len(seen) == 3
    handle.remove()
    _call(model, ids)
    assert len(fake_capture) == 1 and state_of(model).cuda_graphs.replays == 1


def test_capture_failure_runs_eagerly(monkeypatch):
    model, ids = _quantized()

    def broken(*_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "_capture", broken)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for _ in range(3):
        assert torch.equal(_call(model, ids).logits, ref)
    (reason,) = state_of(model).cuda_graphs.refused.values()
    assert reason.startswith("capture failed: RuntimeError: operation not permitted")


def test_lru_keeps_at_most_max_graphs_and_stops_capturing_when_inputs_cycle(fake_capture, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    monkeypatch.setattr(cuda_graphs, "MAX_EVICTIONS", 3)
    model, _ = _quantized()
    graphs = state_of(model).cuda_graphs
    for seq in (8, 9, 10):
        ids = torch.randint(0, 128, (1, seq))
        _call(model, ids)
        _call(model, ids)
    assert len(graphs.graphs) == 2 and graphs.evictions == 1
    for seq in (11, 12, 13, 14):
        ids = torch.randint(0, 128, (1, seq))
        _call(model, ids)
        _call(model, ids)
    assert graphs.evictions == 3 and len(fake_capture) == 5  # seq 13 and 14: no longer captured
    replays = graphs.replays
    ids = torch.randint(0, 128, (1, 12))
    out = _call(model, ids).logits  # a kept graph still replays
    assert graphs.replays == replays + 1
    with torch.no_grad():
        assert torch.equal(out, model(input_ids=ids).logits)


def test_eligibility_and_switches():
    model, ids = _quantized()
    state = state_of(model)
    cuda_ids = ids  # CPU tensors: never eligible
    with torch.no_grad():
        assert not cuda_graphs.eligible(model, state, [cuda_ids])
    qpass.set_cuda_graphs(model, False)
    assert not state.cuda_graphs.enabled
    qpass.set_cuda_graphs(model, True)
    copied = copy.deepcopy(model)
    assert state_of(copied).cuda_graphs.enabled and not state_of(copied).cuda_graphs.graphs


def _quantized_eagerly_and_with_graphs(config, monkeypatch):
    """The same tiny Llama quantized twice on 5 batches: eagerly, then with every forward
    eligible for a (stand-in) CUDA graph. Returns (eager model, graphs model, batches)."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(5)]

    def loop(m):
        for b in batches:
            m(input_ids=b)

    ref = qpass.quantize(copy.deepcopy(base), copy.deepcopy(config), loop)
    monkeypatch.setattr(cuda_graphs, "eligible", lambda model, state, tensors: bool(tensors))
    return ref, qpass.quantize(copy.deepcopy(base), copy.deepcopy(config), loop), batches


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_calibration_forwards_capture_once_statistics_exist_and_give_the_same_amax(fake_capture, monkeypatch, config):
    """With every forward eligible (as on CUDA), max calibration's first batch runs eagerly
    (creating the running statistics), the second is captured, later ones replay; the amax
    values equal a calibration without graphs, and the pass's graphs are dropped after it."""
    ref, model, _ = _quantized_eagerly_and_with_graphs(config, monkeypatch)
    assert len(fake_capture) == 1 and sum(c.graph.replays for c in fake_capture) == 4
    assert state_of(model).calib_graphs is None
    for (n, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n


def test_histogram_calibration_is_not_captured(fake_capture, monkeypatch):
    from qpass.calib.histogram import calibrate_histogram

    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    loop = lambda m: [m(input_ids=b) for b in batches]  # noqa: E731
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer",
                             "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
    cfg["algorithm"] = None
    model = qpass.quantize(tiny_llama().eval(), cfg, loop)
    monkeypatch.setattr(cuda_graphs, "eligible", lambda model, state, tensors: bool(tensors))
    calibrate_histogram(model, loop, method="percentile")
    assert not fake_capture


@pytest.mark.parametrize("config", ["INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG:mse",
                                    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG:gptq"])
def test_algorithms_give_the_same_model_when_forwards_replay_graphs(fake_capture, monkeypatch, config):
    """Every forward eligible (as on CUDA): the algorithms' passes (activation captures with hooks,
    calibration, scoring) and the quantized model's forwards give exactly what they give eagerly."""
    name, _, algorithm = config.partition(":")
    cfg = copy.deepcopy(getattr(qpass, name))
    if algorithm:
        cfg["algorithm"] = algorithm
    ref, model, batches = _quantized_eagerly_and_with_graphs(cfg, monkeypatch)
    with torch.no_grad():
        outs = [model(input_ids=batches[0]).logits for _ in range(3)]
    assert fake_capture and state_of(model).cuda_graphs.replays >= 1
    for (n, a), (_, b) in zip(list(ref.named_parameters()) + list(ref.named_buffers()),
                              list(model.named_parameters()) + list(model.named_buffers())):
        assert torch.equal(a, b), n
    monkeypatch.undo()
    with torch.no_grad():
        want = ref(input_ids=batches[0]).logits
    assert all(torch.equal(o, want) for o in outs)
