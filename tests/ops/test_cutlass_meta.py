"""The Hopper metadata layout against CUTLASS's own layout object (a host probe compiled from
the CUTLASS headers), the conversion's round trip and padding, and argument checks."""

from __future__ import annotations

import subprocess

import pytest
import torch
from native_probes import build_probe
from weights24 import packed

from knsparse.ops import meta as cm

SHAPES = [(32, 64), (64, 128), (96, 256), (128, 576), (160, 384)]


@pytest.fixture(scope="module")
def sm90_probe(tmp_path_factory):
    return build_probe("sm90_meta_layout_probe", tmp_path_factory.mktemp("probe"), needs_cutlass=True)


@pytest.mark.parametrize(("rows", "depth"), [*SHAPES, (64, 3072), (200, 128)])
def test_sm90_positions_match_cutlass_layout(sm90_probe, rows, depth):
    run = subprocess.run([str(sm90_probe), str(rows), str(depth)], capture_output=True, text=True, check=True)
    table = torch.tensor([[int(v) for v in line.split()] for line in run.stdout.splitlines()])
    cutlass = torch.full((rows, depth // 16), -1, dtype=torch.int64)
    cutlass[table[:, 0], table[:, 1]] = table[:, 2]
    assert torch.equal(cm._sm90_meta_positions(rows, depth // 16), cutlass)
    meta_rows, meta_bytes = cm.sm90_meta_shape(rows, depth)
    assert run.stderr.strip() == f"storage_int16={meta_rows * meta_bytes // 2}"


@pytest.mark.parametrize(("rows", "depth"), SHAPES)
def test_sm90_conversion_round_trips_and_pads_with_zeros(rows, depth):
    _, meta = packed(rows, depth)
    hopper = cm.prepare_meta(meta, arch="sm90")
    assert hopper.dtype == torch.uint8
    assert tuple(hopper.shape) == cm.sm90_meta_shape(rows, depth)
    assert torch.equal(cm.sm80_meta_from_sm90(hopper, rows, depth), meta)
    used = torch.zeros(hopper.numel() // 2, dtype=torch.bool)
    used[cm._sm90_meta_positions(rows, depth // 16).reshape(-1)] = True
    assert used.sum() == rows * depth // 16  # one slot per unit, no collisions
    assert not hopper.view(torch.int16).reshape(-1)[~used].any()


def test_prepare_meta_keeps_the_ampere_layout():
    _, meta = packed(32, 64)
    assert cm.prepare_meta(meta) is meta
    assert cm.prepare_meta(meta, arch="sm80") is meta


@pytest.mark.parametrize(
    ("meta", "arch", "error", "match"),
    [
        (torch.zeros(32, 4, dtype=torch.int32), "sm80", TypeError, "int16"),
        (torch.zeros(16, 4, dtype=torch.int16), "sm90", ValueError, "multiple of 32"),
        (torch.zeros(32, 4, dtype=torch.int16), "sm75", ValueError, "'sm80' or 'sm90'"),
    ],
)
def test_prepare_meta_rejects_bad_input(meta, arch, error, match):
    with pytest.raises(error, match=match):
        cm.prepare_meta(meta, arch=arch)
