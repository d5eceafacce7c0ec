"""Distributed calibration with qpass: each rank calibrates on its share of the data.

    torchrun --standalone --nproc_per_node=2 tools/distributed_calibrate_example.py                 # CPU, gloo
    torchrun --standalone --nproc_per_node=8 tools/distributed_calibrate_example.py --device cuda   # GPUs, NCCL
    torchrun --standalone --nproc_per_node=2 tools/distributed_calibrate_example.py --model tiny --config FP8_DEFAULT_CFG

Every rank loads the same model, runs ``qpass.quantize`` with a forward_loop over its own
batches (every WORLD_SIZE-th one), and qpass reduces the calibration statistics across ranks
before computing amax, so every rank ends with the amax of the whole calibration set. The
script checks that all ranks agree, and rank 0 prints the summary and can save the state dict.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

import qpass


class Tiny(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def load(name: str, n_batches: int):
    """(model, list of calibration batches as kwargs dicts); identical on every rank."""
    if name == "tiny":
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        return Tiny().eval(), [{"x": torch.randn(4, 16, 64, generator=g)} for _ in range(n_batches)]
    from qpass import zoo

    model, tok = zoo.load_minilm()
    texts = zoo.sentence_chunks(zoo.text_split().calib, 16 * n_batches)
    return model, zoo.minilm_batches(tok, texts, batch_size=16)


def amax_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("_amax"):
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    p.add_argument("--config", default="INT8_DEFAULT_CFG")
    p.add_argument("--batches", type=int, default=8, help="calibration batches in total (split across ranks)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--save", default="", help="rank 0 saves the quantized state_dict here")
    args = p.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)  # NCCL reduces on the current device
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, batches = load(args.model, args.batches)
        model.to(device)
        if len(batches) < world:
            raise SystemExit(f"{len(batches)} batches for {world} ranks: every rank needs at least one")
        mine = batches[rank::world]  # this rank's share

        def forward_loop(m):
            for b in mine:
                m(**{k: v.to(device) for k, v in b.items()})

        qpass.quantize(model, getattr(qpass, args.config), forward_loop)

        digests = [None] * world
        dist.all_gather_object(digests, amax_digest(model))
        if rank == 0:
            qpass.print_quant_summary(model)
            same = len(set(digests)) == 1
            print(f"{world} rank(s), {len(batches)} batches, {len(mine)} on rank 0; amax identical on "
                  f"every rank: {same} ({digests[0]})")
            if not same:
                raise SystemExit(f"ranks disagree on amax: {digests}")
            if args.save:
                torch.save(model.state_dict(), args.save)
                print(f"saved {args.save}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
