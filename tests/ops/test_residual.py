"""Residual scoring reference: |X - VH|, the k:n selection, padding, errors, the custom ops."""

import pytest
import torch

from knsparse.core.masks import nm_mask
from knsparse.kernels.residual import (
    residual_cpu,
    residual_nm_mask,
    residual_nm_ref,
    residual_ref,
    residual_scores,
)


def bucket(seed: int = 0, rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 32), (7, 24), (12, 16)]
    x = torch.rand(3, 12, 32, generator=g)
    v = torch.rand(3, 12, rank, generator=g)
    h = torch.rand(3, rank, 32, generator=g)
    return x, v, h, torch.tensor(shapes, dtype=torch.int32)


def test_scores_are_abs_residual_inside_and_zero_outside():
    x, v, h, sizes = bucket()
    s = residual_scores(x, v, h, sizes)
    for b, (m, n) in enumerate(sizes.tolist()):
        torch.testing.assert_close(s[b, :m, :n], (x[b, :m, :n] - v[b, :m] @ h[b, :, :n]).abs())
        assert s[b, m:].abs().sum() == 0 and s[b, :, n:].abs().sum() == 0


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "3:8"])
def test_nm_selection_equals_nm_mask_per_matrix(pattern):
    x, v, h, sizes = bucket()
    v[0, :3] = 0  # rows whose residual is X itself; with ties planted below
    x[0, :3, :8] = 0.5
    s, keep = residual_nm_mask(x, v, h, sizes, pattern)
    for b, (m, n) in enumerate(sizes.tolist()):
        assert torch.equal(keep[b, :m, :n], nm_mask(s[b, :m, :n], pattern))
        assert not keep[b, m:].any() and not keep[b, :, n:].any()


def test_nm_selection_along_rows_groups_the_transposed_axis():
    x, v, h, _ = bucket()
    sizes = torch.tensor([[12, 32], [8, 20], [4, 16]], dtype=torch.int32)
    s, keep = residual_nm_mask(x, v, h, sizes, "2:4", along_rows=True)
    for b, (m, n) in enumerate(sizes.tolist()):
        assert torch.equal(keep[b, :m, :n], nm_mask(s[b, :m, :n].T, "2:4").T)
    with pytest.raises(ValueError, match="matrix 0 .* 12 rows, not a multiple of n=8"):
        residual_nm_mask(x, v, h, sizes, "4:8", along_rows=True)


def test_columns_not_divisible_by_n_raise_naming_the_matrix():
    x, v, h, sizes = bucket()
    with pytest.raises(ValueError, match=r"matrix 1 .* 24 columns, not a multiple of n=16"):
        residual_nm_ref(x, v, h, sizes, "8:16")


def test_bad_dtype_and_shape_raise():
    x, v, h, sizes = bucket()
    with pytest.raises(TypeError):
        residual_ref(x.half(), v, h, sizes)
    with pytest.raises(ValueError):
        residual_ref(x, v[:, :5], h, sizes)


def test_custom_ops_schema_and_fake_kernels():
    x, v, h, sizes = bucket()
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.knsparse.residual_scores.default, (x, v, h, sizes), test_utils=utils)
    torch.library.opcheck(
        torch.ops.knsparse.residual_nm.default, (x, v, h, sizes, 2, 4, False), test_utils=utils
    )


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_c_twin_matches_reference_and_writes_in_place(rank):
    x, v, h, sizes = bucket(seed=rank, rank=rank)
    x[1, 7:] = float("nan")  # padding the C kernel must not read
    expected = residual_ref(x, v, h, sizes)
    torch.testing.assert_close(residual_cpu(x, v, h, sizes), expected, rtol=1e-5, atol=1e-6)
    out = residual_cpu(x, v, h, sizes, out=x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out"):
        residual_cpu(x, v, h, sizes, out=torch.empty(3, 12, 31))


def test_c_twin_falls_back_to_reference_without_a_compiler(monkeypatch):
    from knsparse.kernels import nmf_cpu

    x, v, h, sizes = bucket()
    monkeypatch.setattr(nmf_cpu, "_library", lambda rank: None)
    assert torch.equal(residual_cpu(x, v, h, sizes), residual_ref(x, v, h, sizes))
