"""Robustness sweep: qpass vs ModelOpt 0.47 on tiny random transformers models of many families.

For every model family (67: BERT ... Wav2Vec2, then families with unusual layers, SqueezeBERT's
Conv1d "linears" ... HuBERT; see ``SPECS``) a tiny model is built from its config with random
weights (``torch.manual_seed``; nothing is downloaded), then:

1. FP32 reference outputs on a fixed evaluation batch (token ids with a padded attention mask
   for encoders, ``pixel_values`` for vision, ``input_features``/``input_values`` for audio,
   ``decoder_input_ids`` for encoder-decoders; ``use_cache=False`` where the forward takes it,
   no mask where it takes none, random boxes for LayoutLM's ``bbox``); calibration uses 3 other
   batches of the same shapes, and a batch of another shape checks the quantized model again.
2. ``qpass.quantize`` with ``INT8_DEFAULT_CFG`` and ``FP8_DEFAULT_CFG`` (each on a deepcopy) and
   ``mtq.quantize`` with ModelOpt's config of the same name, same batches, on another deepcopy.
3. Comparisons: the quantizer names attached to ``nn.Linear`` / ``nn.Conv*d`` / HF ``Conv1D``
   modules with their enabled flags (symmetric difference; qpass's default rules deliberately
   skip ModelOpt's LayerNorm/pooling input quantizers, so other owners are ignored); the max
   relative amax difference over quantizers enabled in both; output cosines qpass-vs-FP32,
   ModelOpt-vs-FP32 and qpass-vs-ModelOpt on the main output (logits / last_hidden_state / ...);
   qpass's warnings during ``quantize`` are kept (the table names the layers its "no qpass rule
   matches" warning leaves unquantized).
4. ``qpass.export_onnx(target="onnxruntime")`` of the INT8 model, run in ONNX Runtime
   (CPUExecutionProvider) on the evaluation batch: cosine to the fake-quant output.

Every step is guarded: an exception is recorded (type, first line, last traceback frames) and
the sweep goes on. Each model runs under a SIGALRM timeout (``--timeout``). ``--jobs N`` splits
the models over N worker processes (one torch thread each). Prints one markdown table, then the
details of every failure; ``--json`` keeps the raw results, ``--markdown`` writes table+details.

    python tools/sweep_models.py                       # all families, 2 workers
    python tools/sweep_models.py --models bert,gpt2,vit --jobs 1
    python tools/sweep_models.py --list
    python tools/sweep_models.py --json out/sweep.json --markdown out/sweep.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

B, S, S_DEC = 2, 16, 8  # batch, (encoder) sequence length, decoder sequence length
N_CALIB = 3
VOCAB = 128
IMAGE = 32

# --------------------------------------------------------------------------------------------
# Model specs


@dataclass
class Spec:
    name: str
    model_cls: str  # a transformers class name
    config_cls: str  # a transformers config class name
    kind: str  # encoder | decoder | seq2seq | vision | clip | whisper | wav2vec2
    config: dict = field(default_factory=dict)
    out_keys: tuple = ()  # output fields compared; () = logits or last_hidden_state
    image: int = IMAGE  # pixel_values height and width (vision / clip)


_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, **_IDS)
_LLAMALIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_IDS)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=IMAGE, patch_size=8)
_W2V = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)

SPECS = [
    # encoders
    Spec("bert", "BertModel", "BertConfig", "encoder", _BERTLIKE),
    Spec("roberta", "RobertaModel", "RobertaConfig", "encoder", {**_BERTLIKE, "pad_token_id": 1, "bos_token_id": 0}),
    Spec("distilbert", "DistilBertModel", "DistilBertConfig", "encoder",
         dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
              pad_token_id=0)),
    Spec("albert", "AlbertModel", "AlbertConfig", "encoder", {**_BERTLIKE, "embedding_size": 16}),
    Spec("electra", "ElectraModel", "ElectraConfig", "encoder", {**_BERTLIKE, "embedding_size": 16}),
    Spec("deberta-v2", "DebertaV2Model", "DebertaV2Config", "encoder",
         {**_BERTLIKE, "relative_attention": True, "position_buckets": 8, "max_relative_positions": 16,
          "pos_att_type": ["p2c", "c2p"]}),
    Spec("mpnet", "MPNetModel", "MPNetConfig", "encoder", {**_BERTLIKE, "pad_token_id": 1}),
    Spec("xlm-roberta", "XLMRobertaModel", "XLMRobertaConfig", "encoder",
         {**_BERTLIKE, "pad_token_id": 1, "bos_token_id": 0}),
    # decoders
    Spec("gpt2", "GPT2LMHeadModel", "GPT2Config", "decoder",
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_IDS)),
    Spec("gptj", "GPTJForCausalLM", "GPTJConfig", "decoder",
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **_IDS)),
    Spec("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", "decoder",
         {**_LLAMALIKE, "num_key_value_heads": 4}),
    Spec("opt", "OPTForCausalLM", "OPTConfig", "decoder",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
              word_embed_proj_dim=32, max_position_embeddings=64, **_IDS)),
    Spec("bloom", "BloomForCausalLM", "BloomConfig", "decoder",
         dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **_IDS)),
    Spec("falcon", "FalconForCausalLM", "FalconConfig", "decoder",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **_IDS)),
    Spec("phi", "PhiForCausalLM", "PhiConfig", "decoder", {**_LLAMALIKE, "num_key_value_heads": 4}),
    Spec("phi3", "Phi3ForCausalLM", "Phi3Config", "decoder", _LLAMALIKE),
    Spec("llama", "LlamaForCausalLM", "LlamaConfig", "decoder", _LLAMALIKE),
    Spec("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "decoder", _LLAMALIKE),
    Spec("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "decoder", {**_LLAMALIKE, "head_dim": 8}),
    Spec("gemma", "GemmaForCausalLM", "GemmaConfig", "decoder", {**_LLAMALIKE, "head_dim": 8}),
    Spec("gemma2", "Gemma2ForCausalLM", "Gemma2Config", "decoder",
         {**_LLAMALIKE, "head_dim": 8, "sliding_window": 8}),
    Spec("gemma3-text", "Gemma3ForCausalLM", "Gemma3TextConfig", "decoder",
         {**_LLAMALIKE, "head_dim": 8, "sliding_window": 8, "sliding_window_pattern": 2}),
    Spec("mistral", "MistralForCausalLM", "MistralConfig", "decoder", {**_LLAMALIKE, "sliding_window": 8}),
    Spec("stablelm", "StableLmForCausalLM", "StableLmConfig", "decoder", _LLAMALIKE),
    Spec("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", "decoder", _LLAMALIKE),
    Spec("olmo2", "Olmo2ForCausalLM", "Olmo2Config", "decoder", _LLAMALIKE),
    Spec("cohere", "CohereForCausalLM", "CohereConfig", "decoder", _LLAMALIKE),
    # encoder-decoders
    Spec("t5", "T5ForConditionalGeneration", "T5Config", "seq2seq",
         dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    Spec("bart", "BartForConditionalGeneration", "BartConfig", "seq2seq",
         dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
              pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    # vision
    Spec("vit", "ViTModel", "ViTConfig", "vision", _VIT),
    Spec("deit", "DeiTModel", "DeiTConfig", "vision", _VIT),
    Spec("swin", "SwinModel", "SwinConfig", "vision",
         dict(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)),
    Spec("convnext", "ConvNextModel", "ConvNextConfig", "vision",
         dict(image_size=IMAGE, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    Spec("resnet", "ResNetModel", "ResNetConfig", "vision",
         dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
    Spec("mobilenet-v2", "MobileNetV2Model", "MobileNetV2Config", "vision",
         # the default initializer_range (0.02) makes the 17 blocks' output vanish (~1e-26)
         dict(image_size=IMAGE, depth_multiplier=0.25, min_depth=8, initializer_range=0.3)),
    # multimodal / audio
    Spec("clip", "CLIPModel", "CLIPConfig", "clip",
         dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=32, **_IDS),
              vision_config=dict(_VIT), projection_dim=16),
         out_keys=("text_embeds", "image_embeds")),
    Spec("whisper", "WhisperModel", "WhisperConfig", "whisper",
         dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
              max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, decoder_start_token_id=1)),
    Spec("wav2vec2", "Wav2Vec2Model", "Wav2Vec2Config", "wav2vec2", _W2V),
    # -- families with unusual layers --
    # encoders
    Spec("squeezebert", "SqueezeBertModel", "SqueezeBertConfig", "encoder",  # grouped Conv1d "linears"
         {**_BERTLIKE, "embedding_size": 32, "q_groups": 2, "k_groups": 2, "v_groups": 2,
          "post_attention_groups": 2, "intermediate_groups": 2, "output_groups": 2}),
    Spec("mobilebert", "MobileBertModel", "MobileBertConfig", "encoder",  # bottlenecks, NoNorm
         {**_BERTLIKE, "embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16,
          "num_feedforward_networks": 2}),
    Spec("convbert", "ConvBertModel", "ConvBertConfig", "encoder",  # separable convs, grouped linear
         {**_BERTLIKE, "embedding_size": 32, "head_ratio": 2, "conv_kernel_size": 3, "num_groups": 2}),
    Spec("fnet", "FNetModel", "FNetConfig", "encoder",  # FFT token mixing, no attention mask
         {**_BERTLIKE, "use_tpu_fourier_optimizations": False}),
    Spec("funnel", "FunnelModel", "FunnelConfig", "encoder",  # pooled queries, upsampling decoder
         dict(vocab_size=VOCAB, block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=4, d_head=8,
              d_inner=64, pad_token_id=0)),
    Spec("xlnet", "XLNetModel", "XLNetConfig", "encoder",  # q/k/v/o are einsum'd nn.Parameters
         dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64, **_IDS)),
    Spec("longformer", "LongformerModel", "LongformerConfig", "encoder",  # sliding + global attention
         {**_BERTLIKE, "pad_token_id": 1, "bos_token_id": 0, "attention_window": [4, 4]}),
    Spec("big-bird", "BigBirdModel", "BigBirdConfig", "encoder",  # block-sparse attention
         {**_BERTLIKE, "attention_type": "block_sparse", "block_size": 2, "num_random_blocks": 1}),
    Spec("canine", "CanineModel", "CanineConfig", "encoder",  # hashed chars, Conv1d downsampling
         dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, num_hash_functions=4, num_hash_buckets=64, downsampling_rate=4,
              local_transformer_stride=4, pad_token_id=0)),
    Spec("layoutlm", "LayoutLMModel", "LayoutLMConfig", "encoder",  # 2-D position embeddings (bbox)
         {**_BERTLIKE, "max_2d_position_embeddings": 64}),
    Spec("data2vec-text", "Data2VecTextModel", "Data2VecTextConfig", "encoder",
         {**_BERTLIKE, "pad_token_id": 1, "bos_token_id": 0}),
    # decoders
    Spec("gpt-bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", "decoder",  # multi-query attention
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True, **_IDS)),
    Spec("codegen", "CodeGenForCausalLM", "CodeGenConfig", "decoder",  # fused qkv split in mp_num parts
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, rotary_dim=4,
              **_IDS)),
    Spec("mpt", "MptForCausalLM", "MptConfig", "decoder",  # ALiBi, bias-free LayerNorm
         dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, **_IDS)),
    Spec("persimmon", "PersimmonForCausalLM", "PersimmonConfig", "decoder",  # q/k LayerNorm, partial RoPE
         {**_LLAMALIKE, "num_key_value_heads": 4, "partial_rotary_factor": 0.5, "qk_layernorm": True}),
    Spec("granite", "GraniteForCausalLM", "GraniteConfig", "decoder",  # embedding/residual multipliers
         {**_LLAMALIKE, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0}),
    Spec("nemotron", "NemotronForCausalLM", "NemotronConfig", "decoder",  # LayerNorm1P, relu^2
         {**_LLAMALIKE, "head_dim": 8, "partial_rotary_factor": 0.5}),
    Spec("mamba", "MambaForCausalLM", "MambaConfig", "decoder",  # selective scan, depthwise Conv1d
         dict(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
              time_step_rank=4, **_IDS)),
    Spec("mamba2", "Mamba2ForCausalLM", "Mamba2Config", "decoder",  # SSD chunked scan, gated RMSNorm
         dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, state_size=8, expand=2, n_groups=1,
              chunk_size=8, num_hidden_layers=2, **_IDS)),
    # vision
    Spec("dinov2", "Dinov2Model", "Dinov2Config", "vision",  # LayerScale
         {**_VIT, "mlp_ratio": 2}),
    Spec("beit", "BeitModel", "BeitConfig", "vision",  # relative position bias, mean pooling
         {**_VIT, "use_relative_position_bias": True}),
    Spec("segformer", "SegformerModel", "SegformerConfig", "vision",  # reduced-K/V attention, DWConv MLP
         dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
              strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32)),
    Spec("efficientnet", "EfficientNetModel", "EfficientNetConfig", "vision",  # depthwise conv, SE
         # 3 MBConv blocks; hidden_dim is the top conv's width (1280 * 0.25). The BatchNorm weights are
         # drawn with initializer_range: at 0.02 the output underflows to exactly 0
         dict(image_size=IMAGE, width_coefficient=0.25, depth_coefficient=1.0, hidden_dim=320,
              in_channels=[32, 16], out_channels=[16, 24], kernel_sizes=[3, 5], strides=[1, 2],
              num_block_repeats=[1, 2], expand_ratios=[1, 6], initializer_range=0.6)),
    Spec("regnet", "RegNetModel", "RegNetConfig", "vision",  # grouped conv, SE (Y blocks)
         dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y")),
    Spec("poolformer", "PoolFormerModel", "PoolFormerConfig", "vision",  # AvgPool2d token mixer, GroupNorm
         dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
              padding=[2, 1], pool_size=3, mlp_ratio=2.0)),
    Spec("levit", "LevitModel", "LevitConfig", "vision",  # Linear+BatchNorm1d, attention-bias lookup
         dict(image_size=64, hidden_sizes=[16, 32], num_attention_heads=[1, 2], depths=[1, 1], key_dim=[8, 8],
              mlp_ratio=[2, 2], attention_ratio=[2, 2], down_ops=[["Subsample", 8, 16 // 8, 4, 2, 2]],
              initializer_range=0.2),  # at 0.02 the output is ~1e-8
         image=64),  # 4 stride-2 patch convs: 64 -> 4x4 tokens
    # multimodal / audio
    Spec("siglip", "SiglipModel", "SiglipConfig", "clip",  # nn.MultiheadAttention pooling head
         dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=32, **_IDS),
              vision_config=dict(_VIT)),
         out_keys=("text_embeds", "image_embeds")),
    Spec("sew", "SEWModel", "SEWConfig", "wav2vec2",  # squeezed (pooled + upsampled) sequence
         {**_W2V, "squeeze_factor": 2}),
    Spec("hubert", "HubertModel", "HubertConfig", "wav2vec2", _W2V),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}


def build(spec: Spec):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, spec.config_cls)(**copy.deepcopy(spec.config))
    model = getattr(transformers, spec.model_cls)(config).eval()
    return model


def _ids(g, *shape):
    return torch.randint(3, VOCAB, shape, generator=g)


def make_inputs(spec: Spec, model, seed: int, other_shape: bool = False) -> dict:
    """One batch of keyword inputs for ``model`` (seed 0 is the evaluation batch).
    ``other_shape``: batch 3 and shorter sequences (images and audio keep their size)."""
    g = torch.Generator().manual_seed(1000 + seed)
    B, S, S_DEC = (3, 11, 5) if other_shape else (globals()["B"], globals()["S"], globals()["S_DEC"])
    cfg = model.config
    kind = spec.kind
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 4 - seed % 3:] = 0  # padding at the end of the second row
    mask[-1, S - 2:] = 0
    if kind == "encoder":
        inputs = dict(input_ids=_ids(g, B, S), attention_mask=mask)
    elif kind == "decoder":
        inputs = dict(input_ids=_ids(g, B, S))
    elif kind == "seq2seq":
        inputs = dict(input_ids=_ids(g, B, S), attention_mask=mask, decoder_input_ids=_ids(g, B, S_DEC))
    elif kind == "vision":
        inputs = dict(pixel_values=torch.randn(B, 3, spec.image, spec.image, generator=g))
    elif kind == "clip":
        inputs = dict(input_ids=_ids(g, B, S), attention_mask=mask,
                      pixel_values=torch.randn(B, 3, spec.image, spec.image, generator=g))
    elif kind == "whisper":
        frames = 2 * cfg.max_source_positions
        inputs = dict(input_features=torch.randn(B, cfg.num_mel_bins, frames, generator=g),
                      decoder_input_ids=_ids(g, B, S_DEC))
    elif kind == "wav2vec2":
        inputs = dict(input_values=torch.randn(B, 1600, generator=g))
    else:
        raise ValueError(kind)
    params = inspect.signature(model.forward).parameters
    if "attention_mask" not in params:  # FNet takes no mask
        inputs.pop("attention_mask", None)
    if "bbox" in params:  # LayoutLM: one (x0, y0, x1, y1) box per token
        xy = torch.randint(0, cfg.max_2d_position_embeddings // 2, (B, S, 2), generator=g)
        inputs["bbox"] = torch.cat([xy, xy + torch.randint(1, cfg.max_2d_position_embeddings // 2, (B, S, 2),
                                                            generator=g)], dim=-1)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def main_output(spec: Spec, out) -> torch.Tensor:
    keys = spec.out_keys or tuple(k for k in ("logits", "last_hidden_state") if _get(out, k) is not None)[:1]
    if not keys:
        raise ValueError(f"no logits/last_hidden_state in output {type(out).__name__}")
    return torch.cat([_get(out, k).detach().flatten().float() for k in keys])


def _get(out, key):
    try:
        return out[key]
    except (KeyError, TypeError, IndexError):
        return getattr(out, key, None)


def output_keys(spec: Spec, out) -> tuple:
    return spec.out_keys or tuple(k for k in ("logits", "last_hidden_state") if _get(out, k) is not None)[:1]


# --------------------------------------------------------------------------------------------
# Comparisons


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() != b.numel():
        raise ValueError(f"shape mismatch: {a.numel()} vs {b.numel()} elements")
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


_SUFFIXES = ("input_quantizer", "weight_quantizer", "output_quantizer")


def _weighted_types():
    from torch import nn

    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)
    try:
        from transformers.pytorch_utils import Conv1D

        types += (Conv1D,)
    except ImportError:
        pass
    return types


def _is_hf_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def quantizer_flags(model) -> dict[str, bool]:
    """``{name: enabled}`` of the input/weight/output quantizers owned by Linear/Conv/HF-Conv1D modules."""
    weighted = _weighted_types()
    out = {}
    for name, q in model.named_modules():
        if not name.endswith(_SUFFIXES):
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, weighted):
            out[name] = bool(q.is_enabled)
    return out


def conv1d_summary(model, owners: list[str]) -> str:
    """``"enabled/total"`` quantizers on the HF Conv1D modules ``owners`` (GPT-2 style; named from
    the FP32 model: ModelOpt converts them to a QuantLinear, qpass leaves them as they are)."""
    flags = quantizer_flags(model)
    on = [n for n, e in flags.items() if e and n.rpartition(".")[0] in owners]
    total = [n for n in flags if n.rpartition(".")[0] in owners]
    return f"{len(owners)} Conv1D, {len(on)}/{len(total)} quantizers on"


def amax_values(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, q in model.named_modules():
        if not name.endswith(_SUFFIXES) or not getattr(q, "is_enabled", False):
            continue
        a = getattr(q, "amax", None)
        if isinstance(a, torch.Tensor):
            out[name] = a.detach().float().flatten()
    return out


def enabled_without_amax(model) -> list[str]:
    """Enabled static quantizers that calibration never reached: a quantizer the traced graph
    does not use (or ModelOpt's forward never called)."""
    out = []
    for name, q in model.named_modules():
        if not name.endswith("_quantizer") or not getattr(q, "is_enabled", False):
            continue
        if getattr(q, "amax", None) is None and not _is_dynamic(q):
            out.append(name)
    return out


def _is_dynamic(q) -> bool:
    attrs = getattr(q, "_attrs", None)  # qpass
    block = attrs.get("block_sizes") if isinstance(attrs, dict) else getattr(q, "block_sizes", None)
    return isinstance(block, dict) and block.get("type") == "dynamic"


def amax_diff(qa: dict, ma: dict) -> tuple[float, str, list]:
    """(max relative difference, worst name, names with differing shapes) over shared names."""
    worst, worst_name, shape_mismatch = 0.0, "", []
    for name in sorted(set(qa) & set(ma)):
        a, b = qa[name], ma[name]
        if a.numel() != b.numel():
            shape_mismatch.append(f"{name} {a.numel()} vs {b.numel()}")
            continue
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        if rel > worst or math.isnan(rel):
            worst, worst_name = rel, name
    return worst, worst_name, shape_mismatch


# --------------------------------------------------------------------------------------------
# One model


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout("per-model timeout")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _short(filename: str) -> str:
    return filename.split("site-packages/")[-1] if "site-packages" in filename else os.path.relpath(filename)


def error_record(e: BaseException) -> dict:
    msg = _ANSI.sub("", str(e)).strip().splitlines()
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    rec = dict(type=type(e).__name__, first_line=(msg[0] if msg else "")[:400],
               message="\n".join(msg)[:2000],
               frames=[f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames])
    cause, seen = e, 0
    while (cause.__cause__ or cause.__context__) is not None and seen < 10:  # the innermost cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if cause is not e:
        cmsg = [ln for ln in _ANSI.sub("", str(cause)).strip().splitlines() if ln.strip()]
        rec["cause"] = f"{type(cause).__name__}: " + " / ".join(cmsg[:2])[:500]
        rec["cause_frames"] = [f"{_short(f.filename)}:{f.lineno} {f.name}"
                               for f in traceback.extract_tb(cause.__traceback__)[-3:]]
    return rec


class Step:
    """``with Step(result, "qpass_int8"):`` records an exception under result["errors"][name]."""

    def __init__(self, result: dict, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, et, e, tb):
        self.result.setdefault("times", {})[self.name] = round(time.perf_counter() - self.t0, 2)
        if e is None:
            return False
        if isinstance(e, _Timeout) or not isinstance(e, Exception):
            return False  # a timeout (or Ctrl-C) ends the model
        self.result.setdefault("errors", {})[self.name] = error_record(e)
        return True


@contextlib.contextmanager
def _quiet(record: list | None = None):
    """Silence stdout and warnings; append the distinct messages of the warnings about
    quantization (qpass's: an unquantized layer, a pattern matching nothing) to ``record``."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        yield
    if record is not None:
        for w in caught:
            msg = str(w.message)
            if ("qpass" in msg or "quantiz" in msg.lower()) and msg not in record:
                record.append(msg)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def run_onnx(model, spec: Spec, inputs: dict, ref_out, keys) -> tuple[float, int]:
    """(cosine of ONNX Runtime's output to ``ref_out``, number of QuantizeLinear nodes)."""
    import numpy as np
    import onnxruntime as ort

    import qpass

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        with _quiet():
            qpass.export_onnx(model, path, example_inputs=dict(inputs), target="onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        import onnx

        n_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)
        feeds = {}
        for i in sess.get_inputs():
            if i.name not in inputs:
                raise KeyError(f"ONNX input {i.name!r} is not one of the model inputs {sorted(inputs)}")
            feeds[i.name] = inputs[i.name].numpy()
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(None, feeds)))
    picked = []
    leaves = [v for v in ref_out.values() if isinstance(v, torch.Tensor)] if hasattr(ref_out, "values") else []
    for k in keys:
        if k in outs:
            picked.append(outs[k])
            continue
        # no such output name: the output in the same position among the model's tensor outputs
        pos = [i for i, v in enumerate(leaves) if v is _get(ref_out, k)]
        if not pos or pos[0] >= len(names):
            raise KeyError(f"ONNX outputs {names} have no {k!r}")
        picked.append(outs[names[pos[0]]])
    ort_main = torch.from_numpy(np.concatenate([p.reshape(-1) for p in picked]).astype(np.float32))
    return cosine(ort_main, main_output(spec, ref_out)), n_q


def run_model(spec: Spec, do_modelopt: bool = True, do_onnx: bool = True) -> dict:
    import qpass

    res: dict = dict(model=spec.name, build="ok")
    try:
        with _quiet():
            base = build(spec)
    except Exception as e:  # noqa: BLE001
        res["build"] = "skip"
        res.setdefault("errors", {})["build"] = error_record(e)
        return res
    # every quantized copy starts from this state: some models change themselves in a forward (BigBird
    # switches to full attention for good on a short input), and the reference forwards run on ``base``
    pristine = copy.deepcopy(base)
    res["params"] = sum(p.numel() for p in base.parameters())
    conv1d = [n for n, m in base.named_modules() if _is_hf_conv1d(m)]
    res["conv1d_modules"] = len(conv1d)
    eval_in = make_inputs(spec, base, 0)
    calib = [make_inputs(spec, base, i) for i in range(1, N_CALIB + 1)]

    def loop(m):
        with torch.no_grad():
            for b in calib:
                m(**b)

    with Step(res, "fp32"):
        fp_out = _forward(base, eval_in)
        keys = output_keys(spec, fp_out)
        fp = main_output(spec, fp_out)
        res["out_keys"] = list(keys)
    if "fp32" in res.get("errors", {}):
        res["build"] = "forward fails"
        return res

    models: dict = {}
    for cfg_name in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"):
        tag = cfg_name.split("_")[0].lower()
        for prefix, step in (("q", "qpass"), ("mo", "modelopt")):
            if prefix == "mo" and not do_modelopt:
                continue
            with Step(res, f"{step}_{tag}"):  # the same calls in both libraries
                lib = qpass if prefix == "q" else importlib.import_module("modelopt.torch.quantization")
                m = copy.deepcopy(pristine)
                with _quiet(res.setdefault(f"q_{tag}_warnings", []) if prefix == "q" else None):
                    lib.quantize(m, copy.deepcopy(getattr(lib, cfg_name)), loop)
                models[f"{prefix}_{tag}"] = m
                out = _forward(m, eval_in)
                res[f"{prefix}_{tag}_cos"] = cosine(main_output(spec, out), fp)
                res[f"_{prefix}_{tag}_out"] = out
                res[f"{prefix}_{tag}_no_amax"] = enabled_without_amax(m)
                if prefix == "q":
                    res[f"q_{tag}_identical"] = bool(torch.equal(main_output(spec, out), fp))
        if f"q_{tag}" in models and f"mo_{tag}" in models:
            with Step(res, f"compare_{tag}"):
                res[f"qmo_{tag}_cos"] = cosine(main_output(spec, res[f"_q_{tag}_out"]),
                                               main_output(spec, res[f"_mo_{tag}_out"]))
                qf, mf = quantizer_flags(models[f"q_{tag}"]), quantizer_flags(models[f"mo_{tag}"])
                only_q = sorted(f"{n}={int(e)}" for n, e in qf.items() if mf.get(n) != e)
                only_mo = sorted(f"{n}={int(e)}" for n, e in mf.items() if qf.get(n) != e)
                res[f"{tag}_names"] = dict(qpass=len(qf), qpass_on=sum(qf.values()), modelopt=len(mf),
                                           modelopt_on=sum(mf.values()), only_qpass=only_q, only_modelopt=only_mo)
                worst, where, shapes = amax_diff(amax_values(models[f"q_{tag}"]), amax_values(models[f"mo_{tag}"]))
                res[f"{tag}_amax"] = dict(max_rel=worst, worst=where, shape_mismatch=shapes)
                if res["conv1d_modules"]:
                    res[f"{tag}_conv1d"] = dict(qpass=conv1d_summary(models[f"q_{tag}"], conv1d),
                                                modelopt=conv1d_summary(models[f"mo_{tag}"], conv1d))
    if "q_int8" in models:
        with Step(res, "qpass_int8_other_shape"):  # batch 3, shorter sequences: a second trace
            other = make_inputs(spec, base, 0, other_shape=True)
            res["q_int8_shape_cos"] = cosine(main_output(spec, _forward(models["q_int8"], other)),
                                             main_output(spec, _forward(base, other)))
    if "mo_int8" in models:
        with Step(res, "qpass_int8_modelopt_rules"):  # ModelOpt's LayerNorm/pooling quantizers too
            m = copy.deepcopy(pristine)
            with _quiet():
                qpass.quantize(m, copy.deepcopy(qpass.INT8_DEFAULT_CFG), loop, rules="modelopt")
            res["qmo_int8_rules_cos"] = cosine(main_output(spec, _forward(m, eval_in)),
                                               main_output(spec, res["_mo_int8_out"]))
            del m
    if do_onnx and "q_int8" in models:
        with Step(res, "onnx_int8"):
            res["ort_cos"], res["onnx_quantize_linear"] = run_onnx(models["q_int8"], spec, eval_in,
                                                                   res["_q_int8_out"], keys)
    for k in [k for k in res if k.startswith("_")]:
        del res[k]
    return res


def run_guarded(spec: Spec, timeout: int, **kw) -> dict:
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    t0 = time.perf_counter()
    try:
        res = run_model(spec, **kw)
    except _Timeout:
        res = dict(model=spec.name, build="timeout", errors=dict(timeout=dict(
            type="Timeout", first_line=f"over {timeout}s", message="", frames=[])))
    except Exception as e:  # noqa: BLE001 - never stop the sweep
        res = dict(model=spec.name, build="crash", errors=dict(sweep=error_record(e)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --------------------------------------------------------------------------------------------
# Report


def _fmt(x, digits=5):
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _step_cell(r, key, step):
    if key in r:
        return _fmt(r[key])
    err = r.get("errors", {}).get(step)
    return f"ERR {err['type']}" if err else "-"


def _unquantized_layers(messages: list[str]) -> list[str]:
    """The layers named by qpass's "no qpass rule matches" warnings."""
    return [m.split("'")[1] for m in messages if "no qpass rule matches" in m and m.count("'") >= 2]


def table(results: list[dict]) -> str:
    head = ("| model | build | qpass INT8 cos | ModelOpt INT8 cos | q-vs-mo cos | name diff | amax rel diff "
            "| FP8 q/mo cos | ONNX/ORT cos | notes |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        notes = []
        for step, e in r.get("errors", {}).items():
            notes.append(f"{step}: {e['type']}: {e['first_line'][:90]}")
        names = r.get("int8_names")
        if names:
            diff = len(names["only_qpass"]) + len(names["only_modelopt"])
            name_cell = (f"{diff} ({names['qpass_on']}/{names['qpass']} vs "
                         f"{names['modelopt_on']}/{names['modelopt']} on)")
        else:
            name_cell = _step_cell(r, "-", "compare_int8")
        f8 = r.get("fp8_names")
        if f8 and (f8["only_qpass"] or f8["only_modelopt"]):
            notes.append(f"FP8 name diff {len(f8['only_qpass']) + len(f8['only_modelopt'])}")
        amax = r.get("int8_amax")
        amax_cell = "-"
        if amax:
            amax_cell = f"{amax['max_rel']:.1e}"
            if amax["shape_mismatch"]:
                notes.append(f"{len(amax['shape_mismatch'])} amax shape mismatches")
        if "fp8_amax" in r and r["fp8_amax"]["max_rel"] > 1e-5:
            notes.append(f"FP8 amax rel diff {r['fp8_amax']['max_rel']:.1e}")
        if "qmo_fp8_cos" in r and r["qmo_fp8_cos"] < 0.999:
            notes.append(f"FP8 q-vs-mo cos {r['qmo_fp8_cos']:.4f}")
        if "qmo_int8_rules_cos" in r:
            notes.append(f"rules=modelopt q-vs-mo {r['qmo_int8_rules_cos']:.6f}")
        if "q_int8_shape_cos" in r and r["q_int8_shape_cos"] < min(r.get("q_int8_cos", 1.0), 0.999) - 0.01:
            notes.append(f"other-shape INT8 cos {r['q_int8_shape_cos']:.4f}")
        for lib, key in (("qpass", "q_int8_no_amax"), ("ModelOpt", "mo_int8_no_amax")):
            if r.get(key):
                notes.append(f"{lib}: {len(r[key])} enabled INT8 quantizers without amax (e.g. {r[key][0]})")
        unq = _unquantized_layers(r.get("q_int8_warnings", []))
        if unq:
            notes.append(f"qpass warns {len(unq)} layers unquantized ({', '.join(unq[:3])}{', ...' * (len(unq) > 3)})")
        if r.get("q_int8_identical"):
            notes.append("qpass INT8 output == FP32 bit for bit (nothing quantized)")
        if r.get("onnx_quantize_linear") == 0:
            notes.append("ONNX has no QuantizeLinear")
        c1 = r.get("int8_conv1d")
        if c1:
            notes.append(f"HF Conv1D: qpass {c1['qpass']}; ModelOpt {c1['modelopt']}")
        fp8 = f"{_step_cell(r, 'q_fp8_cos', 'qpass_fp8')} / {_step_cell(r, 'mo_fp8_cos', 'modelopt_fp8')}"
        lines.append("| " + " | ".join([
            r["model"], r["build"], _step_cell(r, "q_int8_cos", "qpass_int8"),
            _step_cell(r, "mo_int8_cos", "modelopt_int8"), _step_cell(r, "qmo_int8_cos", "compare_int8"),
            name_cell, amax_cell, fp8, _step_cell(r, "ort_cos", "onnx_int8"),
            "; ".join(notes).replace("|", "/") or f"{r.get('seconds', '?')}s"]) + " |")
    return "\n".join(lines)


def details(results: list[dict]) -> str:
    out = []
    for r in results:
        for key in ("q_int8_no_amax", "mo_int8_no_amax", "q_fp8_no_amax", "mo_fp8_no_amax"):
            if r.get(key):
                out.append(f"### {r['model']}: {key}: {len(r[key])} enabled quantizers without amax")
                out += [f"- `{n}`" for n in r[key][:12]]
        if r.get("q_int8_warnings"):
            out.append(f"### {r['model']}: qpass INT8 warnings")
            out += [f"- {m}" for m in r["q_int8_warnings"][:12]]
        for tag in ("int8", "fp8"):
            names = r.get(f"{tag}_names")
            if names and (names["only_qpass"] or names["only_modelopt"]):
                out.append(f"### {r['model']}: {tag.upper()} quantizer-name differences")
                out += [f"- only/differs in qpass: `{n}`" for n in names["only_qpass"][:12]]
                out += [f"- only/differs in ModelOpt: `{n}`" for n in names["only_modelopt"][:12]]
                extra = len(names["only_qpass"]) + len(names["only_modelopt"]) - 24
                if extra > 0:
                    out.append(f"- ... {extra} more")
            amax = r.get(f"{tag}_amax")
            if amax and (amax["max_rel"] > 1e-5 or amax["shape_mismatch"]):
                out.append(f"### {r['model']}: {tag.upper()} amax: max rel {amax['max_rel']:.2e} at `{amax['worst']}`")
                out += [f"- shape: {s}" for s in amax["shape_mismatch"][:8]]
        for step, e in r.get("errors", {}).items():
            out.append(f"### {r['model']}: {step} -> {e['type']}")
            out.append("```")
            out.append(e["message"][:1200])
            out += [f"  at {f}" for f in e.get("frames", [])]
            if "cause" in e:
                out.append(f"caused by {e['cause']}")
                out += [f"  at {f}" for f in e.get("cause_frames", [])]
            out.append("```")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# CLI


def _select(arg: str | None) -> list[Spec]:
    if not arg:
        return list(SPECS)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPEC_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(SPEC_BY_NAME)}")
    return [SPEC_BY_NAME[n] for n in names]


def _run_workers(specs, args) -> list[dict]:
    """Split ``specs`` round-robin over ``args.jobs`` worker processes; merge their JSON results."""
    groups = [specs[i::args.jobs] for i in range(args.jobs)]
    procs = []
    with tempfile.TemporaryDirectory() as d:
        for i, group in enumerate(g for g in groups if g):
            path = os.path.join(d, f"w{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--jobs", "1", "--threads", "1", "--quiet",
                   "--timeout", str(args.timeout), "--models", ",".join(s.name for s in group), "--json", path]
            cmd += ["--no-modelopt"] * (not args.modelopt) + ["--no-onnx"] * (not args.onnx)
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL), path, group))
        results = {}
        for p, path, group in procs:
            p.wait()
            if os.path.exists(path):
                with open(path) as f:
                    for r in json.load(f):
                        results[r["model"]] = r
            for s in group:  # a worker that died takes its unfinished models with it
                results.setdefault(s.name, dict(model=s.name, build="crash", errors=dict(worker=dict(
                    type="WorkerDied", first_line=f"worker exit code {p.returncode}", message="", frames=[]))))
    return [results[s.name] for s in specs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated subset (see --list); default all")
    p.add_argument("--list", action="store_true", help="print the model names and exit")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1 = in this process)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--timeout", type=int, default=150, help="seconds per model (default 150)")
    p.add_argument("--no-modelopt", dest="modelopt", action="store_false", help="skip ModelOpt")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX/ORT check")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--markdown", help="write the table and failure details here")
    p.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{s.name:14s} {s.model_cls}" for s in SPECS))
        return 0
    specs = _select(args.models)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.jobs > 1 and len(specs) > 1:
        results = _run_workers(specs, args)
    else:
        results = []
        for s in specs:
            r = run_guarded(s, args.timeout, do_modelopt=args.modelopt, do_onnx=args.onnx)
            results.append(r)
            if not args.quiet:
                print(f"[{r['seconds']:6.1f}s] {s.name}: {r['build']}, errors: {sorted(r.get('errors', {}))}",
                      file=sys.stderr, flush=True)
            if args.json:  # keep partial results if the run is cut short
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1, default=str)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    text = table(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n\n## Details\n\n" + details(results) + "\n")
    if not args.quiet:
        print(f"\n{len(results)} models in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
