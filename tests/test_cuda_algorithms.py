"""GPU checks (``pytest -m cuda``) beyond the formats: the calibration algorithms, real_quantize,
auto_quantize, ONNX export and the compile backend's weight-only paths, each on a CUDA model.

The algorithms' searches run float GEMMs whose rounding differs between CPU and GPU kernels, so
their results are compared by the quantized model's outputs (cosine to the CPU run), not bit for
bit; the quantizer state must live on the model's device.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import qpass

from conftest import tiny_llama

pytestmark = pytest.mark.cuda


def _ids(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _with_algorithm(name, algorithm):
    cfg = copy.deepcopy(qpass.config.get_preset(name))
    cfg["algorithm"] = algorithm
    return cfg


ALGORITHMS = {
    "smoothquant": qpass.INT8_SMOOTHQUANT_CFG,
    "int4_awq": qpass.INT4_AWQ_CFG,
    "w4a8_awq": qpass.W4A8_AWQ_BETA_CFG,
    "nvfp4_awq_lite": qpass.NVFP4_AWQ_LITE_CFG,
    "nvfp4_awq_clip": qpass.NVFP4_AWQ_CLIP_CFG,
    "int4_gptq": _with_algorithm("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq"),
    "int8_mse": _with_algorithm("INT8_DEFAULT_CFG", "mse"),
    "nvfp4_static_fp8_sweep": qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG,
    "nvfp4_static_local_hessian": qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG,
    "nvfp4_four_over_six": qpass.NVFP4_FOUR_OVER_SIX_CFG,
    "nvfp4_svdquant": qpass.NVFP4_SVDQUANT_DEFAULT_CFG,
}


def _quantized_pair(cfg):
    batches = _ids()
    cpu = qpass.quantize(tiny_llama(), copy.deepcopy(cfg), lambda m: [m(input_ids=b) for b in batches])
    gpu = qpass.quantize(tiny_llama().cuda(), copy.deepcopy(cfg), lambda m: [m(input_ids=b.cuda()) for b in batches])
    return cpu, gpu


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_on_cuda_matches_cpu(name):
    cpu, gpu = _quantized_pair(ALGORITHMS[name])
    for n, b in gpu.named_buffers():
        assert b.device.type == "cuda", n
    x = _ids(1, seed=7)[0]
    ref = cpu(input_ids=x).logits
    out = gpu(input_ids=x.cuda()).logits.cpu()
    assert torch.isfinite(out).all()
    assert _cos(out, ref) > 0.999, name


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_calibration_on_cuda_matches_cpu(method):
    from qpass.calib.histogram import calibrate_histogram

    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append(
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
    cfg["algorithm"] = None
    batches = _ids()
    amax = []
    for device in ("cpu", "cuda"):
        loop = lambda m: [m(input_ids=b.to(device)) for b in batches]  # noqa: E731
        model = qpass.quantize(tiny_llama().to(device), copy.deepcopy(cfg), loop)
        calibrate_histogram(model, loop, method)
        amax.append({n: b for n, b in model.named_buffers() if n.endswith("input_quantizer._amax")})
    cpu, gpu = amax
    assert cpu.keys() == gpu.keys() and cpu
    for n in cpu:
        assert gpu[n].device.type == "cuda", n
        # one histogram bin of slack: the bin edges come from float sums that differ by kernel
        torch.testing.assert_close(gpu[n].cpu(), cpu[n], rtol=2e-2, atol=0)


@pytest.mark.parametrize("name", ["INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG"])
def test_real_quantize_on_cuda_is_bit_identical_to_fake_quant(name):
    batches = _ids()
    base = tiny_llama().cuda()
    loop = lambda m: [m(input_ids=b.cuda()) for b in batches]  # noqa: E731
    fake = qpass.quantize(copy.deepcopy(base), name, loop)
    cfg = copy.deepcopy(qpass.config.get_preset(name))
    inner = cfg.get("algorithm")
    cfg["algorithm"] = {"method": "real_quantize", **({"additional_algorithm": inner} if inner else {})}
    packed = qpass.quantize(copy.deepcopy(base), cfg, loop)
    x = batches[0].cuda()
    assert torch.equal(fake(input_ids=x).logits, packed(input_ids=x).logits)
    fp_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    packed_bytes = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
    assert packed_bytes < fp_bytes


def test_auto_quantize_on_cuda():
    from qpass.auto_quantize import auto_quantize

    model = tiny_llama(2).cuda()
    data = [b.cuda() for b in _ids(2)]

    def loss_func(out, batch):
        logits = out.logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    model, sd = auto_quantize(model, {"effective_bits": 6.0}, ["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None], data,
                              lambda m, b: m(input_ids=b), loss_func, num_calib_steps=2, num_score_steps=2)
    assert sd["best"]["is_satisfied"]
    out = model(input_ids=data[0]).logits
    assert out.device.type == "cuda" and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_AWQ_CFG"])
def test_export_onnx_from_cuda_model(name, tmp_path):
    import onnx

    from qpass.export.compare import ort_session

    batches = _ids()
    model = qpass.quantize(tiny_llama().cuda(), name, lambda m: [m(input_ids=b.cuda()) for b in batches])
    x = batches[0]
    ref = model(input_ids=x.cuda()).logits.float().cpu()
    path = qpass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs={"input_ids": x.cuda()})
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = ort_session(path)
    feed = {i.name: x.numpy() for i in sess.get_inputs()}
    out = torch.from_numpy(sess.run(None, feed)[0])
    assert _cos(out, ref) > 0.9999


@pytest.mark.parametrize("name", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG",
                                  "FP8_DEFAULT_CFG"])
def test_compile_backend_on_cuda_llama(name):
    from qpass.export import compile_backend as cb

    batches = _ids()
    model = tiny_llama().cuda().to(torch.bfloat16)
    model = qpass.quantize(model, name, lambda m: [m(input_ids=b.cuda()) for b in batches])
    x = batches[0].cuda()
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()
        torch._dynamo.reset()
        out = torch.compile(model, backend="qpass")(input_ids=x).logits.float()
    # NVFP4 quantizes activations dynamically to 4 bits: inductor keeps fused intermediates in
    # float32 where eager rounds them to bfloat16, and a flipped FP4 code moves a logit visibly
    assert _cos(out, ref) > (0.99 if name.startswith("NVFP4") else 0.999), name
    rep = cb.report(model)
    assert rep.lowered or rep.fell_back


@pytest.mark.parametrize("name", ["smoothquant", "int4_awq"])
def test_smoothing_keeps_its_undo_copies_off_the_gpu(name):
    """The unsmoothed values a smoothing run keeps (for a later re-calibration) live in host
    memory: after calibration the GPU holds the model once, and re-calibrating still starts from
    exactly the unsmoothed weights."""
    from qpass.graph.quantized_model import state_of

    batches = _ids()
    loop = lambda m: [m(input_ids=b.cuda()) for b in batches]  # noqa: E731
    model = tiny_llama().cuda()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    qpass.quantize(model, copy.deepcopy(ALGORITHMS[name]), loop)
    saved = state_of(model).unsmoothed._tensors
    assert saved and all(value.device.type == "cpu" for _, value, _ in saved)
    for _, value, label in saved:  # the values before smoothing, by state_dict name
        assert torch.equal(value, original[label].cpu()), label
    algorithm = copy.deepcopy(ALGORITHMS[name])["algorithm"]
    qpass.calibrate(model, algorithm, loop)  # starts from the restored originals: same result
    again = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = qpass.quantize(tiny_llama().cuda(), copy.deepcopy(ALGORITHMS[name]), loop)
    for k, v in fresh.state_dict().items():
        assert torch.equal(again[k], v), k
