"""CPU float8 decoding through tables of torch's own casts: the same bits as ``.float()``."""

import pytest
import torch

from qpass.formats.floating import E4M3, E5M2


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_every_code_and_code_pair_decodes_to_torchs_bits(fmt):
    pairs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(fmt.torch_dtype)
    got = fmt.decode(pairs)  # even count: two codes per lookup
    assert torch.equal(got.view(torch.int32), pairs.float().view(torch.int32))
    single = torch.arange(255, dtype=torch.uint8).view(fmt.torch_dtype)  # odd count: one per lookup
    assert torch.equal(fmt.decode(single).view(torch.int32), single.float().view(torch.int32))
    grid = pairs[:4096].reshape(64, 64)[:, ::2]  # not contiguous
    assert torch.equal(fmt.decode(grid).view(torch.int32), grid.float().view(torch.int32))
