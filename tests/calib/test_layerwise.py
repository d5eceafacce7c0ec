"""Layer-by-layer calibration gives exactly the whole-model result, one block at a time."""

import copy
import weakref

import pytest
import torch

import qpass
from qpass.calib.histogram import calibrate_histogram
from qpass.calib.layerwise import DeviceMover, layerwise_mode
from qpass.errors import CalibrationError, QuantConfigError
from qpass.graph.quantized_model import is_quantized

from conftest import MLP, needs_minilm, needs_smollm2, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(name, layerwise=None, algorithm=...):
    cfg = copy.deepcopy(qpass.config.get_preset(name))
    if algorithm is not ...:
        cfg["algorithm"] = algorithm
    if layerwise is not None:
        algo = cfg["algorithm"]
        algo = {"method": algo} if isinstance(algo, str) else dict(algo)
        algo["layerwise"] = layerwise
        cfg["algorithm"] = algo
    return cfg


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(whole, layerwise, need=("_amax",)):
    assert whole.keys() == layerwise.keys()
    for suffix in need:
        assert any(k.endswith(suffix) for k in whole), f"no {suffix} to compare"
    differ = [k for k in whole if not torch.equal(whole[k], layerwise[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _llama_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 6 + 2 * i), generator=g) for i in range(3)]


def _both_modes(make, config_name, loop, **layerwise_cfg):
    whole = make()
    qpass.quantize(whole, _config(config_name), loop)
    lw = make()
    outs = []

    def recording_loop(m):
        outs.clear()
        loop(m, outs)

    qpass.quantize(lw, _config(config_name, layerwise={"enable": True, **layerwise_cfg}), recording_loop)
    return _snapshot(whole), _snapshot(lw), outs


@pytest.mark.parametrize("config, need", [
    ("INT8_DEFAULT_CFG", ("_amax",)),
    ("INT8_SMOOTHQUANT_CFG", ("_amax", "_pre_quant_scale")),
    ("INT4_AWQ_CFG", ("_amax", "_pre_quant_scale")),
    ("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", ("_amax", "_global_amax")),
    ("NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", ("_amax", "_global_amax")),
])
def test_tiny_llama_identical_to_whole_model(config, need):
    batches = _llama_batches()

    def loop(m, outs=None):
        for b in batches:
            out = m(input_ids=b)
            if outs is not None:
                outs.append(out)

    whole, lw, outs = _both_modes(lambda: tiny_llama(layers=2), config, loop)
    assert_identical(whole, lw, need)
    assert outs and all(o is None for o in outs)  # the layerwise pass only recorded the inputs


def test_smoothquant_grown_sample_identical_to_whole_model(monkeypatch):
    """On more than 4096 calibration tokens SmoothQuant's search sample grows (one token in eight):
    the layerwise pass keeps exactly the whole-model sample, so the result is the same."""
    import qpass.algorithms.smoothquant as sq

    sizes = []
    search = sq.search_alpha_clip

    def recording(model, unit, stats, *a, **k):
        sizes.append(stats.sample.shape[0])
        return search(model, unit, stats, *a, **k)

    monkeypatch.setattr(sq, "search_alpha_clip", recording)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (4, 256), generator=g) for _ in range(6)]  # 6144 tokens

    def loop(m, outs=None):
        for b in batches:
            out = m(input_ids=b)
            if outs is not None:
                outs.append(out)

    whole, lw, _ = _both_modes(lambda: tiny_llama(layers=2), "INT8_SMOOTHQUANT_CFG", loop)
    assert_identical(whole, lw, ("_amax", "_pre_quant_scale"))
    assert sizes and set(sizes) == {6144 // 8}


def test_tiny_bert_calibrate_keyword_and_mse_over_two_input_structures():
    """Batches with and without an attention mask: two traced graphs, scheduled block by block together."""
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 128, (2, 9), generator=g),
                "attention_mask": torch.ones(2, 9, dtype=torch.long)} for _ in range(2)]
    batches[1]["attention_mask"][1, 6:] = 0
    batches.insert(1, {"input_ids": torch.randint(0, 128, (2, 7), generator=g)})
    loop = lambda m: [m(**b) for b in batches]  # noqa: E731
    for algorithm in ("max", {"method": "mse"}):
        whole, lw = tiny_bert(), tiny_bert()
        qpass.quantize(whole, _config("INT8_DEFAULT_CFG", algorithm=algorithm), loop)
        qpass.quantize(lw, _config("INT8_DEFAULT_CFG", algorithm=None), loop)
        qpass.calibrate(lw, algorithm, loop, layerwise=True)
        assert_identical(_snapshot(whole), _snapshot(lw))
        assert len(lw._qpass_state.graphs) == 2


def test_histogram_calibration_through_layerwise_mode():
    batches = _llama_batches()
    loop = lambda m: [m(input_ids=b) for b in batches]  # noqa: E731
    cfg = _config("INT8_DEFAULT_CFG", algorithm=None)
    cfg["quant_cfg"].append(
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
    whole, lw = tiny_llama(layers=2), tiny_llama(layers=2)
    for m in (whole, lw):
        qpass.quantize(m, cfg, loop)
    calibrate_histogram(whole, loop, "entropy")
    with layerwise_mode(lw):
        calibrate_histogram(lw, loop, "entropy")
    assert_identical(_snapshot(whole), _snapshot(lw))


def _quantizer_order(model, loop, layerwise):
    seen = []
    handles = [q.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[0].shape[1])))
               for name, q in model.named_modules() if name.endswith("o_proj.input_quantizer")]
    try:
        qpass.calibrate(model, "max", loop, layerwise=layerwise)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_each_block_runs_over_every_batch_before_the_next():
    batches = _llama_batches()
    loop = lambda m: [m(input_ids=b) for b in batches]  # noqa: E731
    model = tiny_llama(layers=2)
    qpass.quantize(model, _config("INT8_DEFAULT_CFG"), loop)
    lens = [b.shape[1] for b in batches]
    l0, l1 = "model.layers.0.self_attn.o_proj.input_quantizer", "model.layers.1.self_attn.o_proj.input_quantizer"
    assert _quantizer_order(model, loop, False) == [(q, n) for n in lens for q in (l0, l1)]
    assert _quantizer_order(model, loop, True) == [(l0, n) for n in lens] + [(l1, n) for n in lens]


class CopyingMover(DeviceMover):
    """A fake second device on the CPU: every weight is copied "to the device"; each copy is
    watched, so the test sees which copies are alive when the next one is made."""

    def __init__(self):
        super().__init__("cpu")
        self.copies = []  # (stage, weakref)
        self.overlaps = []

    @staticmethod
    def stage_of(target):
        parts = target.split(".")
        return ".".join(parts[:3]) if target.startswith("model.layers.") else "glue"

    def needs_move(self, t):
        return True

    def attr(self, target, value):
        self.stage = self.stage_of(target)
        return super().attr(target, value)

    def copy(self, t):
        alive = {stage for stage, ref in self.copies if ref() is not None}
        if alive - {self.stage}:
            self.overlaps.append((self.stage, alive))
        out = t.clone()
        self.copies.append((self.stage, weakref.ref(out)))
        return out


def test_blocks_are_placed_on_the_device_one_at_a_time():
    batches = _llama_batches()
    loop = lambda m: [m(input_ids=b) for b in batches]  # noqa: E731
    whole, lw = tiny_llama(layers=2), tiny_llama(layers=2)
    qpass.quantize(whole, _config("INT8_SMOOTHQUANT_CFG"), loop)
    qpass.quantize(lw, _config("INT8_SMOOTHQUANT_CFG", algorithm=None), loop)
    mover = CopyingMover()
    with layerwise_mode(lw, mover=mover):
        qpass.calibrate(lw, "smoothquant", loop)
    stages = [s for s, _ in mover.copies]
    assert {"glue", "model.layers.0", "model.layers.1"} <= set(stages)
    assert stages == sorted(stages, key=lambda s: (s != "glue", s))  # prefix, then blocks in order
    assert not mover.overlaps, f"weights of an earlier segment were still alive: {mover.overlaps[:2]}"
    assert all(ref() is None for _, ref in mover.copies)  # nothing stays on the device
    assert_identical(_snapshot(whole), _snapshot(lw), ("_amax", "_pre_quant_scale"))


@pytest.mark.parametrize("config, algorithm, need", [
    ("INT8_SMOOTHQUANT_CFG", ..., ("_amax", "_pre_quant_scale")),
    ("INT8_SMOOTHQUANT_CFG", {"method": "smoothquant", "gptq": True}, ("_amax", "_pre_quant_scale")),
    ("INT4_AWQ_CFG", ..., ("_amax", "_pre_quant_scale")),
    ("INT4_AWQ_CFG", {"method": "awq_clip"}, ("_amax",)),
])
def test_offline_searches_run_on_the_calibration_device(monkeypatch, config, algorithm, need):
    """Layerwise calibration of a model whose weights live elsewhere than the forwards ran runs
    each unit's search (and GPTQ rounding) there, one unit at a time, and writes only the results
    home. On the CPU a clone stands in for the device copy: the result must be the whole-model one,
    every parameter the original object, and every copy freed."""
    import qpass.calib.compute_device as cd
    import qpass.calib.layerwise as lwmod

    batches = _llama_batches()
    loop = lambda m: [m(input_ids=b) for b in batches]  # noqa: E731
    whole = tiny_llama(layers=2)
    qpass.quantize(whole, _config(config, algorithm=algorithm), loop)
    lw = tiny_llama(layers=2)
    params = {n: p for n, p in lw.named_parameters()}
    copies = []

    def device_copy(t, device):
        out = t.clone()
        copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(cd, "_copy", device_copy)
    monkeypatch.setattr(lwmod, "offline_device", lambda model, device: torch.device("cpu"))
    qpass.quantize(lw, _config(config, layerwise={"enable": True}, algorithm=algorithm), loop)
    assert len(copies) > 8  # the units' weights and statistics went through the stand-in
    assert all(ref() is None for ref in copies)  # nothing kept on the device
    for n, p in lw.named_parameters():  # untying aside, the same Parameter objects
        assert params.get(n) is p or n.endswith("lm_head.weight"), n
    assert_identical(_snapshot(whole), _snapshot(lw), need)


# ---------------------------------------------------------------------- errors
def test_model_without_blocks_is_refused_and_left_untouched(mlp):
    data = [torch.randn(4, 32)]
    with pytest.raises(CalibrationError, match=r"MLP has no nn.ModuleList.*without layerwise"):
        qpass.quantize(mlp, _config("INT8_DEFAULT_CFG", layerwise={"enable": True}), lambda m: [m(x) for x in data])
    assert type(mlp) is MLP and not is_quantized(mlp)
    assert not any(n.endswith("quantizer") for n, _ in mlp.named_modules())


def test_forward_loop_using_outputs_gets_a_layerwise_error():
    batches = _llama_batches()
    model = tiny_llama(layers=2)
    qpass.quantize(model, _config("INT8_DEFAULT_CFG"), lambda m: [m(input_ids=b) for b in batches])
    before = _snapshot(model)
    with pytest.raises(CalibrationError, match=r"layerwise mode .* returns None.*must not use the model's outputs"):
        qpass.calibrate(model, "max", lambda m: [m(input_ids=b).logits.sum() for b in batches], layerwise=True)
    assert_identical(before, _snapshot(model))  # the previous calibration stays


@pytest.mark.parametrize("layerwise, match", [
    ({"enable": True, "bogus": 1}, "unknown key 'bogus'; allowed: enable"),
    ({"enable": True, "checkpoint_dir": "/tmp/x"}, "checkpoint_dir .* not implemented"),
    ({"enable": False, "checkpoint_dir": "/tmp/x"}, "checkpoint_dir requires enable=True"),
    ({"enable": True, "get_qdq_activations_from_prev_layer": True}, "get_qdq_activations_from_prev_layer=True"),
    ({"enable": "yes"}, "enable must be bool"),
    ({"enable": True, "save_every": 0}, "save_every must be >= 1"),
    ("on", "must be a bool or a dict"),
])
def test_bad_options_are_refused_before_any_work(mlp, layerwise, match):
    calls = []
    with pytest.raises(QuantConfigError, match=match):
        qpass.quantize(mlp, _config("INT8_DEFAULT_CFG", layerwise=layerwise), lambda m: calls.append(1))
    assert not calls and not is_quantized(mlp)


def test_option_conflicts_are_refused(mlp):
    with pytest.raises(QuantConfigError, match="calib_mutates_weights=False .* 'smoothquant' changes weights"):
        qpass.quantize(mlp, _config("INT8_SMOOTHQUANT_CFG", layerwise={"enable": True, "calib_mutates_weights": False}),
                       lambda m: None)
    data = [torch.randn(4, 32)]
    qpass.quantize(mlp, _config("INT8_DEFAULT_CFG"), lambda m: [m(x) for x in data])
    with pytest.raises(QuantConfigError, match="contradicts"):
        qpass.calibrate(mlp, {"method": "max", "layerwise": {"enable": False}}, lambda m: None, layerwise=True)


# ---------------------------------------------------------------------- real models
def _compare_real(make, config, loop):
    whole = make()
    qpass.quantize(whole, _config(config), loop)
    w = _snapshot(whole)
    del whole
    lw = make()
    qpass.quantize(lw, _config(config, layerwise={"enable": True}), loop)
    return w, _snapshot(lw)


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("config, need", [
    ("INT8_DEFAULT_CFG", ("_amax",)),
    ("INT8_SMOOTHQUANT_CFG", ("_amax", "_pre_quant_scale")),
    ("INT4_AWQ_CFG", ("_amax", "_pre_quant_scale")),
])
def test_smollm2_first_layers_identical(config, need):
    from qpass import zoo

    _, tok = zoo.load_smollm2(1)
    windows = zoo.token_windows(tok, zoo.text_split().calib, 4, 32)
    loop = lambda m: [m(input_ids=windows[i:i + 2]) for i in (0, 2)]  # noqa: E731
    assert_identical(*_compare_real(lambda: zoo.load_smollm2(4)[0], config, loop), need)


@needs_minilm
@pytest.mark.real_model
@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"])
def test_minilm_identical(config):
    from qpass import zoo

    _, tok = zoo.load_minilm()
    batches = zoo.minilm_batches(tok, zoo.sentence_chunks(zoo.text_split().calib, 8), batch_size=4)
    assert_identical(*_compare_real(lambda: zoo.load_minilm()[0], config, lambda m: [m(**b) for b in batches]))


# ---------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("config", ["INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG"])
def test_cuda_blocks_stay_on_cpu_and_peak_memory_drops(config):
    """Whole model on the GPU vs. the model on the CPU with one block at a time on the GPU:
    the same result bit for bit (the searches run on the GPU in both modes), a fraction of the GPU
    memory (weights included in both peaks)."""
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()

    def peak_of(run):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = run()
        torch.cuda.synchronize()
        return model, torch.cuda.max_memory_allocated() - base

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 64), generator=g) for _ in range(4)]
    loop = lambda m: [m(input_ids=b.cuda()) for b in batches]  # noqa: E731
    whole, whole_peak = peak_of(lambda: qpass.quantize(make().cuda(), _config(config), loop))
    w = {k: v.cpu() for k, v in _snapshot(whole).items()}
    del whole
    lw_cfg = _config(config, layerwise={"enable": True})
    lw, lw_peak = peak_of(lambda: qpass.quantize(make(), lw_cfg, loop))
    assert all(t.device.type == "cpu" for t in lw.state_dict().values())  # weights, amax and scales stay home
    if config == "INT8_SMOOTHQUANT_CFG":  # the memory bound (AWQ's searches hold more temporaries)
        assert lw_peak < 0.25 * whole_peak, (lw_peak, whole_peak)
    assert_identical(w, _snapshot(lw), ("_amax", "_pre_quant_scale"))
    out = lw(input_ids=batches[0])  # the calibrated CPU model runs on the CPU afterwards
    assert torch.isfinite(out.logits).all()
