"""GPU checks (``pytest -m cuda``): numerics and calibration on CUDA equal the CPU's."""

import copy

import pytest
import torch

import qpass
from qpass.formats import QuantSpec

from conftest import tiny_llama

pytestmark = pytest.mark.cuda

SPECS = [
    dict(num_bits=8, axis=None),
    dict(num_bits=8, axis=0),
    dict(num_bits=(4, 3), axis=None),
    dict(num_bits=4, block_sizes={-1: 128, "type": "static"}),
    dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}),
    dict(num_bits=(4, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}),
    dict(num_bits=(2, 1), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attrs", SPECS, ids=lambda a: str(a["num_bits"]) + str(a.get("block_sizes", a.get("axis"))))
def test_fake_quant_cuda_equals_cpu(attrs, dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 256) * 3).to(dtype)
    spec = QuantSpec.from_attributes(**attrs)
    amax = spec.amax_of(x) if spec.needs_amax else None
    cpu = spec.fake_quant(x, amax)
    gpu = spec.fake_quant(x.cuda(), None if amax is None else amax.cuda())
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_quantize_on_cuda_matches_cpu(config):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    cpu_model = qpass.quantize(copy.deepcopy(model), config, lambda m: m(input_ids=ids))
    gpu_model = qpass.quantize(copy.deepcopy(model).cuda(), config, lambda m: m(input_ids=ids.cuda()))
    for (n, a), (_, b) in zip(cpu_model.named_buffers(), gpu_model.named_buffers()):
        if n.endswith("weight_quantizer._amax"):  # the same weights: the same bits
            assert torch.equal(a, b.cpu()), n
        elif n.endswith("_amax"):
            # activations come from CUDA's GEMM and attention kernels, whose float32 sums
            # differ from the CPU's in the last bits
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=0, msg=n)
    out_cpu = cpu_model(input_ids=ids).logits
    out_gpu = gpu_model(input_ids=ids.cuda()).logits.cpu()
    cos = torch.nn.functional.cosine_similarity(out_cpu.flatten(), out_gpu.flatten(), dim=0)
    assert cos > 0.9999
