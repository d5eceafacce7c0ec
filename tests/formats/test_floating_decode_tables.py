"""CPU float8 decoding through tables of torch's own casts: the same bits as ``.float()``."""

import pytest
import torch

from qpass.formats.floating import E1M2, E2M1, E2M3, E3M2, E4M3, E5M2


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_every_code_and_code_pair_decodes_to_torchs_bits(fmt):
    pairs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(fmt.torch_dtype)
    got = fmt.decode(pairs)  # even count: two codes per lookup
    assert torch.equal(got.view(torch.int32), pairs.float().view(torch.int32))
    single = torch.arange(255, dtype=torch.uint8).view(fmt.torch_dtype)  # odd count: one per lookup
    assert torch.equal(fmt.decode(single).view(torch.int32), single.float().view(torch.int32))
    grid = pairs[:4096].reshape(64, 64)[:, ::2]  # not contiguous
    assert torch.equal(fmt.decode(grid).view(torch.int32), grid.float().view(torch.int32))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_cpu_arithmetic_rounding_matches_torchs_cast(fmt):
    """The CPU rounding (quantum built in the exponent field) against torch's cast there and back,
    on random bit patterns (every exponent, subnormals, signed zeros, NaN) and on every midpoint."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (4_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    v = bits.view(torch.float32)
    v = torch.cat([v[~torch.isinf(v)], torch.tensor([0.0, -0.0, fmt.max, -fmt.max, 1e30, -1e30])])
    vals = fmt.values().double()
    mids = ((vals[1:] + vals[:-1]) / 2).float()
    v = torch.cat([v, mids, -mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 1e9))])
    want = v.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype).float()
    got = fmt.round(v)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    again = v.clone()
    assert torch.equal(fmt.round_(again)[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2, E1M2], ids=["e2m1", "e2m3", "e3m2", "e1m2"])
def test_sub_byte_arithmetic_rounding_matches_the_table_search(fmt):
    """Sub-byte formats round by quantum arithmetic; the table search (encode + decode) is the
    reference: random bit patterns (every exponent, subnormals, signed zeros, NaN, inf) and every
    midpoint with its neighbours, to the bit (NaN saturates to +max in both)."""
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-2**31, 2**31 - 1, (2_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    v = bits.view(torch.float32) * 1e-36  # most random patterns land far outside +-max; bring many in
    vals = fmt.values().double()
    mids = ((vals[1:] + vals[:-1]) / 2).float()
    v = torch.cat([v, bits.view(torch.float32), mids, -mids, torch.nextafter(mids, torch.zeros(())),
                   torch.nextafter(mids, torch.full((), 1e9)), vals.float(), -vals.float(),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e30])])
    want = fmt.decode(fmt.encode(v))
    got = fmt.round_(v.clone())
    assert not torch.isnan(got).any()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(fmt.round(v).view(torch.int32), want.view(torch.int32))
