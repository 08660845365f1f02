import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_pack,
)
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_to_dense_cutlass as torch_unpack,
)

from knsparse import nm_mask, pack_24, unpack_24
from knsparse.core.pack import min_shape

DTYPES = [torch.float16, torch.bfloat16, torch.int8]


def strict_24(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A weight with exactly two nonzeros in every group of 4 (the only input whose encoding is
    the same across torch versions)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    if dtype == torch.int8:
        w = (w * 40).round().clamp(-127, 127)
    w[w == 0] = 1
    w = w * nm_mask(torch.rand(m, k, generator=g), "2:4")
    return w.to(dtype)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES), mi=st.integers(1, 3), ki=st.integers(1, 3), seed=st.integers(0, 999))
def test_bit_exact_with_torch_reference(dtype, mi, ki, seed):
    rows, cols = min_shape(dtype)
    w = strict_24(rows * mi, cols * ki, dtype, seed)
    packed = pack_24(w)
    ref_values, ref_meta = torch_pack(w)
    assert packed.values.dtype == dtype
    assert packed.meta.dtype == (torch.int32 if dtype == torch.int8 else torch.int16)
    assert torch.equal(packed.values, ref_values)
    assert torch.equal(packed.meta, ref_meta)
    assert torch.equal(unpack_24(packed), w)
    assert torch.equal(torch_unpack(packed.values, packed.meta), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_than_two_nonzeros_round_trip(dtype):
    rows, cols = min_shape(dtype)
    w = strict_24(rows, cols, dtype, 0)
    w[0, :8] = 0
    w[1, 0:4] = torch.tensor([0, 0, 5, 0], dtype=dtype)
    packed = pack_24(w)
    assert torch.equal(unpack_24(packed), w)
    # any valid metadata decodes to the same matrix through torch's own decoder too
    assert torch.equal(torch_unpack(packed.values, packed.meta), w)


def test_mask_keeps_slots_of_zero_weights():
    w = strict_24(32, 64, torch.float16, 1)
    mask = w != 0
    w[0, :] = 0  # kept slots whose weight happens to be zero
    packed = pack_24(w, mask=mask)
    assert torch.equal(unpack_24(packed), w)


def test_padding_round_trip():
    w = strict_24(32, 64, torch.float16, 2)[:20, :40]
    with pytest.raises(ValueError, match="pad=True"):
        pack_24(w)
    packed = pack_24(w, pad=True)
    assert packed.padded_shape == (32, 64) and packed.shape == (20, 40)
    assert torch.equal(unpack_24(packed), w)


def test_refuses_non_24_with_count_and_location():
    w = strict_24(32, 64, torch.float16, 3)
    w[5, 8:12] = 1.0
    w[7, 0:3] = 1.0
    with pytest.raises(ValueError, match=r"2 of 512 groups.*row 5, columns 8..11"):
        pack_24(w)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(32, 64, dtype=torch.float32), "float16, bfloat16 and int8"),
        (torch.zeros(2, 32, 64, dtype=torch.float16), "2-D"),
        (torch.zeros(32, 66, dtype=torch.float16), "multiple of 4"),
    ],
)
def test_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_24(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_refuses_non_finite(value):
    w = strict_24(32, 64, torch.float16, 4)
    w[3, 1] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        pack_24(w)


def test_mask_mismatch_refused():
    w = strict_24(32, 64, torch.float16, 5)
    mask = torch.zeros_like(w, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the mask"):
        pack_24(w, mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_semi_structured_matches_dense(dtype):
    from knsparse import to_semi_structured

    w = strict_24(64, 128, dtype, 6).cuda()
    x = torch.randn(128, 32, dtype=dtype, device="cuda")
    sparse = to_semi_structured(w)
    ref = w.float() @ x.float()
    err = (sparse @ x).float() - ref
    torch_err = (w @ x).float() - ref
    assert err.abs().max() <= 2 * torch_err.abs().max() + 1e-6
