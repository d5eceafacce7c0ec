"""``local_hessian``: the weight-scale search of ModelOpt 0.47's NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG.

1. Max calibration of every quantizer (one ``forward_loop`` pass).
2. A second pass with the weight quantizers off and the activation quantizers on, as calibrated,
   accumulates for each weighted module's input the block-diagonal second moment
   ``H_b = sum_t x_tb x_tb^T / tokens``, ``x_tb`` being token t's ``block_size`` input channels of
   block b (inputs read by several modules, such as q/k/v, are accumulated once).
3. Each weight's amax is searched as :mod:`qpass.algorithms.mse` searches it, with the squared
   error of a weight block ``dw`` (one output row, ``block_size`` input channels) replaced by
   ``dw^T H_b dw``: that block's share of the output error ``|X dW^T|^2``. With
   ``fp8_scale_sweep`` (the default) only static NVFP4 weights are searched, over the 126 E4M3 block
   scales (:func:`qpass.calib.nvfp4_static.sweep_fp8_scales`); without it, every static-range
   weight goes through the multiplier grid. A weight whose input channels are not a multiple of
   ``block_size``, or that no data reached, keeps the plain squared error (ModelOpt's fallback).

ModelOpt warns and skips the algorithm without a ``forward_loop``; qpass refuses it with an error
before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.algorithms import register_algorithm
from qpass.algorithms.max import shared_global_amax_groups
from qpass.algorithms.mse import mse_candidates, mse_search_amax
from qpass.algorithms.smoothing import require_forward_loop
from qpass.calib.capture import ActivationCapture
from qpass.calib.layerwise import run_forward_loop
from qpass.calib.max_calibrate import max_calibrate, weight_quantizer_owners
from qpass.calib.nvfp4_static import static_nvfp4_weights, sweep_fp8_scales
from qpass.errors import CalibrationError, QuantConfigError
from qpass.graph.lazy_outputs import deferred_outputs
from qpass.graph.quantized_model import iter_tensor_quantizers
from qpass.nn.tensor_quantizer import TensorQuantizer


@dataclass(frozen=True)
class BlockHessianStats:
    """``sum_t x_tb x_tb^T`` per input-channel block (never mutated)."""

    xtx: torch.Tensor  # [C // block, block, block] float32
    tokens: int
    calls: int
    channels: int

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx / max(self.tokens, 1)


class BlockHessianCapture(ActivationCapture):
    """Context manager recording :class:`BlockHessianStats` for the input quantizers of ``modules``
    whose input channels split into blocks of ``block_size``."""

    def __init__(self, modules, block_size: int) -> None:
        super().__init__(modules, max_tokens=0)
        self.block_size = block_size

    def reduce_heads(self, heads: list, paths: list[str], devices: list, comm) -> list:
        """The block sums of ``x^T x`` and the counts over the data-parallel ranks."""
        from qpass.calib.capture_reduce import reduce_sums

        usable = [None if h is None or h.xtx.numel() == 0 else h for h in heads]  # channels % block != 0
        return [None if xtx is None else BlockHessianStats(xtx=xtx, tokens=t, calls=c, channels=xtx.shape[0] * xtx.shape[1])
                for xtx, t, c in reduce_sums(usable, paths, devices, comm)]

    @torch.no_grad()
    def _update(self, path, prev, quantizer, x):
        x = self._rows(path, prev, quantizer, x)
        c, b = x.shape[-1], self.block_size
        if c % b:
            return BlockHessianStats(xtx=x.new_zeros(0, b, b), tokens=0, calls=0, channels=c)
        xb = x.reshape(-1, c // b, b).transpose(0, 1)  # [blocks, tokens, block]
        xtx = xb.transpose(1, 2) @ xb
        if prev is not None:
            xtx = prev.xtx + xtx.to(prev.xtx.device)
        return BlockHessianStats(xtx=xtx, tokens=(prev.tokens if prev else 0) + x.shape[0],
                                 calls=(prev.calls if prev else 0) + 1, channels=c)


def hessian_error(h: torch.Tensor):
    """``error_fn(dw)`` for weight errors ``dw`` [rows, C]: each element carries ``1/block`` of its
    block's ``dw^T H_b dw``, so summing an amax element's elements sums its blocks' losses."""
    blocks, b, _ = h.shape

    def error_fn(dw: torch.Tensor) -> torch.Tensor:  # [rows, C]
        d = dw.reshape(dw.shape[0], blocks, b).transpose(0, 1)  # [blocks, rows, b]
        loss = torch.bmm(d, h.to(d.device)).mul_(d).sum(-1).t()  # [rows, blocks]: one GEMM per block
        return (loss / b)[..., None].expand(-1, -1, b).reshape(dw.shape)

    return error_fn


def _check_options(block_size, fp8_scale_sweep, distributed_sync, debug) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise QuantConfigError(f"algorithm 'local_hessian': block_size must be an int >= 1, got {block_size!r}")
    for name, value in (("fp8_scale_sweep", fp8_scale_sweep), ("distributed_sync", distributed_sync), ("debug", debug)):
        if not isinstance(value, bool):
            raise QuantConfigError(f"algorithm 'local_hessian': {name} must be True or False, got {value!r}")


@torch.no_grad()
def _weights_unquantized_pass(model, state, forward_loop, modules: dict, block_size: int) -> dict:
    """Step 2: the block Hessians of the modules' inputs, weights unquantized."""
    weight_quantizers = [q for _, _, wq in weight_quantizer_owners(model) for q in iter_tensor_quantizers(wq)]
    was = [q._if_quant for q in weight_quantizers]
    calls = state.calls
    try:
        for q in weight_quantizers:
            q.disable_quant()
        with BlockHessianCapture(modules, block_size) as capture, deferred_outputs(state):
            run_forward_loop(model, state, forward_loop)
    finally:
        for q, on in zip(weight_quantizers, was):
            if on:
                q.enable_quant()
    if state.calls == calls:
        raise CalibrationError("forward_loop never called the model: it must run model(batch) for the calibration data")
    return {p: st for p, st in capture.stats.items() if st.tokens}


@register_algorithm("local_hessian")
def local_hessian(model, state, forward_loop, step_size=0.1, start_multiplier=0.25, stop_multiplier=4.0,
                  fp8_scale_sweep=True, block_size=16, distributed_sync=True, debug=False, shared_states=None,
                  **common):
    step_size = 0.1 if step_size is None else step_size
    start_multiplier = 0.25 if start_multiplier is None else start_multiplier
    stop_multiplier = 4.0 if stop_multiplier is None else stop_multiplier
    fp8_scale_sweep = True if fp8_scale_sweep is None else fp8_scale_sweep
    block_size = 16 if block_size is None else block_size
    distributed_sync = True if distributed_sync is None else distributed_sync
    debug = False if debug is None else debug
    candidates = mse_candidates(step_size, start_multiplier, stop_multiplier)  # validates first
    _check_options(block_size, fp8_scale_sweep, distributed_sync, debug)
    global_groups = shared_global_amax_groups("local_hessian", model, shared_states)
    require_forward_loop("local_hessian", forward_loop)
    max_calibrate(model, state, forward_loop, distributed_sync=distributed_sync, global_groups=global_groups)
    modules = {p: m for p, m, _ in weight_quantizer_owners(model) if isinstance(m._modules.get("input_quantizer"), TensorQuantizer)}
    stats = _weights_unquantized_pass(model, state, forward_loop, modules, block_size)
    errors = {id(modules[p].weight): hessian_error(st.hessian) for p, st in stats.items()}
    if fp8_scale_sweep:  # as mse: only static NVFP4 weights, the others keep their max amax
        for module, tq in static_nvfp4_weights(model):
            tq.amax = sweep_fp8_scales(tq, module.weight, errors.get(id(module.weight)))
    else:
        for _, module, q in weight_quantizer_owners(model):
            if not isinstance(q, TensorQuantizer) or not q.needs_calibration or q.spec.is_dynamic or q.amax is None:
                continue
            q.amax = mse_search_amax(q, module.weight, candidates, errors.get(id(module.weight)))
    if debug:
        model._local_hessian_stats = stats
