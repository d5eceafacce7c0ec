"""The options of ``torch.compile(model, backend="qpass", ...)``: the backend's own
(``options={...}``) and inductor's modes (``mode=...``), checked before anything is compiled."""

from __future__ import annotations

import torch

#: ``torch.compile(model, backend="qpass", options={...})``: the backend's own options
BACKEND_OPTIONS = {
    # CUDA FP8 GEMMs with _scaled_mm's use_fast_accum: on an H200 (SmolLM2 shape, 8x512) the fused
    # q/k/v and gate/up GEMMs took 0.85 vs 0.93 ms per forward, cosine to bf16 unchanged (0.9912)
    "fp8_fast_accum": True,
    "fuse_shared_inputs": True,  # one GEMM for the linears of a shared-input group (q/k/v, gate/up)
    "cudagraphs": False,  # replay the compiled CUDA code as CUDA graphs (what mode="reduce-overhead" sets)
}

#: ``torch.compile(model, backend="qpass", mode=...)``: inductor's modes, passed on to inductor
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def inductor_patches(mode, opts: dict) -> dict:
    """The inductor settings for a compile: those of ``mode`` (see :data:`MODES`) and CUDA graphs
    when the ``cudagraphs`` option asks for them."""
    from qpass.errors import QuantConfigError

    if mode is not None and mode not in MODES:
        raise QuantConfigError(f"torch.compile backend 'qpass': unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if opts.get("cudagraphs"):
        patches["triton.cudagraphs"] = True
    return patches


def backend_options(options) -> dict:
    """:data:`BACKEND_OPTIONS` updated with the caller's, checked (unknown keys and non-bool values
    are errors naming them)."""
    from qpass.errors import QuantConfigError

    out = dict(BACKEND_OPTIONS)
    for key, value in (options or {}).items():
        if key not in BACKEND_OPTIONS:
            raise QuantConfigError(f"torch.compile backend 'qpass': unknown option {key!r}; "
                                   f"allowed: {', '.join(sorted(BACKEND_OPTIONS))}")
        if not isinstance(value, bool):
            raise QuantConfigError(f"torch.compile backend 'qpass': option {key!r} must be True or False, got {value!r}")
        out[key] = value
    return out
