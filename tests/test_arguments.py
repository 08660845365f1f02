"""Issue 13 class 6: every public function refuses a bad argument with a ValueError/TypeError
whose message names it — never a raw RuntimeError/ZeroDivisionError, never silently."""

import math

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.core.pack import Packed24
from knsparse.pruning import budget, score, spectral

NAN = float("nan")


def w(*shape, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(*shape).to(dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)
    )


EMPTY = torch.empty(0, 8)
META = torch.empty(8, 8, device="meta")
COMPLEX = torch.randn(8, 8, dtype=torch.complex64)
INTS = torch.randint(0, 5, (8, 8))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))


def packed() -> Packed24:
    m = ks.nm_mask(torch.randn(32, 64).abs(), "2:4")
    return ks.pack_24((torch.randn(32, 64) * m).half())


def corrupted_meta() -> Packed24:
    p = packed()
    return Packed24(p.values, torch.zeros_like(p.meta), p.shape)  # every group: slots 0, 0


def wrong_meta_dtype() -> Packed24:
    p = packed()
    return Packed24(p.values, p.meta.int(), p.shape)


def masks_of(model):
    return {"1": torch.ones(16, 64, dtype=torch.bool)}


# (id, call, exception type, regex naming the argument)
PROBES = [
    ("Pattern k<0", lambda: ks.Pattern(-1, 4), ValueError, "-1:4"),
    ("Pattern k>=n", lambda: ks.Pattern(3, 2), ValueError, "3:2"),
    ("Pattern float k", lambda: ks.Pattern(2.0, 4), TypeError, "k=2.0"),
    ("Pattern bool n", lambda: ks.Pattern(1, True), TypeError, "n=True"),
    ("parse int", lambda: ks.Pattern.parse(24), TypeError, "pattern"),
    ("parse 3:2", lambda: ks.Pattern.parse("3:2"), ValueError, "pattern"),
    ("nm_mask empty", lambda: ks.nm_mask(EMPTY, "2:4"), ValueError, "scores is empty"),
    ("nm_mask meta", lambda: ks.nm_mask(META, "2:4"), ValueError, "scores is on the meta"),
    ("nm_mask complex", lambda: ks.nm_mask(COMPLEX, "2:4"), TypeError, "scores must be real"),
    ("nm_mask list", lambda: ks.nm_mask([1, 2, 3, 4], "2:4"), TypeError, "scores must be a torch.Tensor"),
    ("nm_mask 3-D", lambda: ks.nm_mask(w(2, 4, 4), "2:4"), ValueError, "scores must be 2-D or 4-D"),
    ("nm_mask conv_order", lambda: ks.nm_mask(w(4, 8), "2:4", "xyz"), ValueError, "conv_order"),
    ("nm_mask pattern", lambda: ks.nm_mask(w(4, 8), 24), TypeError, "pattern"),
    ("is_nm meta", lambda: ks.is_nm(META, "2:4"), ValueError, "t is on the meta"),
    ("is_nm empty", lambda: ks.is_nm(EMPTY, "2:4"), ValueError, "t is empty"),
    ("is_nm complex", lambda: ks.is_nm(COMPLEX, "2:4"), TypeError, "t must be real"),
    ("is_nm conv_order", lambda: ks.is_nm(w(4, 8), "2:4", "x"), ValueError, "conv_order"),
    ("unstructured sparsity>1", lambda: ks.unstructured_mask(w(4, 8), 1.5), ValueError, "sparsity"),
    ("unstructured sparsity str", lambda: ks.unstructured_mask(w(4, 8), "0.5"), TypeError, "sparsity"),
    ("unstructured sparsity nan", lambda: ks.unstructured_mask(w(4, 8), NAN), ValueError, "sparsity"),
    ("unstructured min_keep_row", lambda: ks.unstructured_mask(w(4, 8), 0.5, -1), ValueError, "min_keep_row"),
    ("unstructured empty", lambda: ks.unstructured_mask(EMPTY, 0.5), ValueError, "scores is empty"),
    ("unstructured complex", lambda: ks.unstructured_mask(COMPLEX, 0.5), TypeError, "scores must be real"),
    ("global sparsity", lambda: ks.global_unstructured_masks({"a": w(4, 8)}, 2.0), ValueError, "sparsity"),
    (
        "global list",
        lambda: ks.global_unstructured_masks([w(4, 8)], 0.5),
        TypeError,
        "scores must be a mapping",
    ),
    ("global meta", lambda: ks.global_unstructured_masks({"a": META}, 0.5), ValueError, r"scores\['a'\]"),
    ("pack float32", lambda: ks.pack_24(w(32, 64)), ValueError, "w: 2:4 packing supports"),
    ("pack int32", lambda: ks.pack_24(INTS), ValueError, "w: 2:4 packing supports"),
    ("pack complex", lambda: ks.pack_24(COMPLEX), TypeError, "w must be real"),
    ("pack empty", lambda: ks.pack_24(torch.empty(0, 64, dtype=torch.half)), ValueError, "w is empty"),
    (
        "pack meta",
        lambda: ks.pack_24(w(32, 64, dtype=torch.half, device="meta")),
        ValueError,
        "w is on the meta",
    ),
    ("pack 3-D", lambda: ks.pack_24(w(2, 32, 64, dtype=torch.half)), ValueError, "w must be 2-D"),
    ("pack pad", lambda: ks.pack_24(w(32, 64).half() * 0, pad="yes"), TypeError, "pad"),
    ("unpack str", lambda: ks.unpack_24("packed"), TypeError, "p must be a Packed24"),
    ("unpack corrupted meta", lambda: ks.unpack_24(corrupted_meta()), ValueError, "p.meta is corrupted"),
    ("unpack meta dtype", lambda: ks.unpack_24(wrong_meta_dtype()), ValueError, "p.meta must be"),
    ("swap model", lambda: ks.swap_modules("model", {}), TypeError, "model"),
    ("swap masks list", lambda: ks.swap_modules(mlp(), [("1", None)]), TypeError, "masks"),
    ("swap include int", lambda: ks.swap_modules(mlp(), {}, include=5), TypeError, "include"),
    ("swap exclude ints", lambda: ks.swap_modules(mlp(), {}, exclude=[1]), TypeError, "exclude"),
    ("swap backend", lambda: ks.swap_modules(mlp(), {}, backend="fast"), ValueError, "backend"),
    ("swap backend type", lambda: ks.swap_modules(mlp(), {}, backend=1), TypeError, "backend"),
    ("swap conv_order", lambda: ks.swap_modules(mlp(), {}, conv_order="x"), ValueError, "conv_order"),
    ("swap mask shape", lambda: ks.swap_modules(mlp(), {"1": torch.ones(64, 16)}), ValueError, "mask shape"),
    ("linear in_features", lambda: ks.SparseLinear(0, 4), ValueError, "in_features"),
    ("linear out_features", lambda: ks.SparseLinear(8, 4.5), TypeError, "out_features"),
    ("linear unstructured", lambda: ks.SparseLinear(8, 4, "unstructured"), ValueError, "pattern"),
    ("linear backend", lambda: ks.SparseLinear(8, 4, backend=3), TypeError, "backend"),
    ("linear dtype", lambda: ks.SparseLinear(8, 4, dtype=torch.int8), TypeError, "dtype"),
    ("conv channels", lambda: ks.SparseConv2d(-4, 8, (3, 3)), ValueError, "in_channels"),
    ("conv conv_order", lambda: ks.SparseConv2d(4, 8, (3, 3), conv_order="x"), ValueError, "conv_order"),
    ("prune sparsity str", lambda: ks.prune(mlp(), "magnitude", sparsity="0.5"), TypeError, "sparsity"),
    ("prune lam1 nan", lambda: ks.prune(mlp(), "magnitude", lam1=NAN), ValueError, "lam1"),
    ("prune lam2 neg", lambda: ks.prune(mlp(), "magnitude", lam2=-1.0), ValueError, "lam2"),
    ("prune lipschitz", lambda: ks.prune(mlp(), "magnitude", lipschitz=-1), ValueError, "lipschitz"),
    (
        "prune lipschitz map",
        lambda: ks.prune(mlp(), "magnitude", lipschitz={"1": NAN}),
        ValueError,
        "lipschitz",
    ),
    (
        "macs mask shape",
        lambda: ks.macs(mlp(), (1, 1, 8, 8), plan={"1": torch.ones(16, 32, dtype=torch.bool)}),
        ValueError,
        "layer '1': mask shape",
    ),
    ("macs mask type", lambda: ks.macs(mlp(), (1, 1, 8, 8), plan={"1": [1]}), TypeError, "layer '1': mask"),
    ("mp_fit empty", lambda: spectral.mp_fit(EMPTY), ValueError, "w is empty"),
    ("mp_fit meta", lambda: spectral.mp_fit(META), ValueError, "w is on the meta"),
    ("mp_fit complex", lambda: spectral.mp_fit(COMPLEX), TypeError, "w must be real"),
    ("mp_fit ints", lambda: spectral.mp_fit(INTS), TypeError, "w must be floating"),
    ("mp_fit tw_quantile", lambda: spectral.mp_fit(w(8, 16), tw_quantile=-1.0), ValueError, "tw_quantile"),
    ("mp_fit band", lambda: spectral.mp_fit(w(8, 16), band=(0.9, 0.1)), ValueError, "band"),
    ("mp_fit_batch 2-D", lambda: spectral.mp_fit_batch(w(8, 16)), ValueError, "ws must be 3-D"),
    ("magnitude meta", lambda: score.magnitude({"a": META}), ValueError, "layer 'a': weight is on the meta"),
    (
        "magnitude complex",
        lambda: score.magnitude({"a": COMPLEX}),
        TypeError,
        "layer 'a': weight must be real",
    ),
    ("magnitude empty", lambda: score.magnitude({"a": EMPTY}), ValueError, "layer 'a': weight is empty"),
    ("yopo rank 0", lambda: score.yopo({"a": w(8, 16)}, rank=0), ValueError, "rank"),
    ("yopo rank float", lambda: score.yopo({"a": w(8, 16)}, rank=2.5), TypeError, "rank"),
    ("yopo iters", lambda: score.yopo({"a": w(8, 16)}, iters=-1), ValueError, "iters"),
    ("yopo seed", lambda: score.yopo({"a": w(8, 16)}, seed="0"), TypeError, "seed"),
    ("yopo_nm rank", lambda: score.yopo_nm_masks({"a": w(8, 16)}, rank="7"), TypeError, "rank"),
    ("yopo int weight", lambda: score.yopo({"a": INTS}), TypeError, "layer 'a'"),
    ("mort sparsity nan", lambda: budget.mort({"a": w(8, 16)}, NAN), ValueError, "sparsity"),
    ("mort tol", lambda: budget.mort({"a": w(8, 16)}, 0.5, tol=0), ValueError, "tol"),
    ("mort meta", lambda: budget.mort({"a": META}, 0.5), ValueError, r"scores\['a'\]"),
    (
        "mort min_keep_col",
        lambda: budget.mort({"a": w(8, 16)}, 0.5, min_keep_col=-2),
        ValueError,
        "min_keep_col",
    ),
    ("emp beta nan", lambda: budget.emp_keep(w(8, 16), beta=NAN), ValueError, "beta"),
    ("emp beta str", lambda: budget.emp_keep(w(8, 16), beta="1"), TypeError, "beta"),
    ("emp empty", lambda: budget.emp_keep(EMPTY), ValueError, "scores is empty"),
    ("permute model", lambda: ks.permute("model", "2:4"), TypeError, "model"),
    ("permute unstructured", lambda: ks.permute(mlp(), "unstructured"), ValueError, "pattern"),
    ("permute max_iters", lambda: ks.permute(mlp(), "2:4", max_iters=-1), ValueError, "max_iters"),
    (
        "permute time budget",
        lambda: ks.permute(mlp(), "2:4", time_budget_s=-1.0),
        ValueError,
        "time_budget_s",
    ),
    ("save model", lambda: ks.save_sparse("model", "x.safetensors"), TypeError, "model"),
    (
        "save folder",
        lambda: ks.save_sparse(mlp(), "/no/such/dir/x.safetensors"),
        ValueError,
        "does not exist",
    ),
    ("load backend", lambda: ks.load_sparse(mlp(), "x.safetensors", backend="fast"), ValueError, "backend"),
    ("prunable_layers", lambda: ks.core.layers.prunable_layers("model"), TypeError, "model"),
]


@pytest.mark.parametrize("call, error, names", [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_bad_argument_is_named(call, error, names):
    with pytest.raises(error, match=names):
        call()


def test_include_and_exclude_take_a_single_name():
    torch.manual_seed(0)
    model = mlp()
    masks = {n: ks.nm_mask(model.get_submodule(n).weight.abs(), "2:4") for n in ("1", "3")}
    report = ks.swap_modules(model, masks, include="1")
    assert list(report.swapped) == ["1"] and report.skipped == {"3": "not matched by include"}
    model = mlp()
    report = ks.swap_modules(model, masks, exclude="3")
    assert list(report.swapped) == ["1"] and report.skipped == {"3": "matched by exclude"}


@pytest.mark.parametrize("rank", [1, 2, 5])
@pytest.mark.parametrize("shape", [(64, 32), (96, 96), (24, 80)])
def test_mp_fit_spikes_of_a_low_rank_matrix_are_its_rank(rank, shape):
    torch.manual_seed(rank)
    u, v = torch.randn(shape[0], rank, dtype=torch.float64), torch.randn(rank, shape[1], dtype=torch.float64)
    assert spectral.mp_fit(u @ v).num_spikes == rank
    low = (u @ v).float()
    assert spectral.mp_fit(low).num_spikes == rank
    assert spectral.mp_fit(low.half()).num_spikes == rank
    # a strong low-rank signal in noise keeps exactly its spikes; pure noise has none
    noisy = low / math.sqrt(rank) * 2 + torch.randn(shape)
    assert spectral.mp_fit(noisy).num_spikes == rank
    assert spectral.mp_fit(torch.randn(shape)).num_spikes == 0


def test_macs_refuses_a_mask_for_another_shape_instead_of_counting_it_sparse():
    model = mlp()
    with pytest.raises(ValueError, match="layer '1': mask shape"):
        ks.macs(model, (1, 1, 8, 8), plan={"1": torch.ones(64, 16, dtype=torch.bool)})
