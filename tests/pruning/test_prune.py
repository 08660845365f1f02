import copy
import json

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.core.masks import is_nm
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.pruning.prune import prune


class ConvNet(nn.Module):
    """RGB stem (3 input channels: no 2:4), a conv, a depthwise conv and two Linear layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc1 = nn.Linear(32 * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc2(torch.relu(self.fc1(self.depthwise(x).flatten(1))))


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return ConvNet()


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    # 80 images: enough GEMM rows for fc1's 512x512 Gram (CAST re-fits on it by default).
    return [(torch.randn(40, 3, 8, 8, generator=g), torch.zeros(40)) for _ in range(2)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="obd"), "method must be one of"),
        (dict(method="magnitude", pattern="5:4"), "invalid sparsity pattern"),
        (dict(method="magnitude", pattern="2:4", sparsity=0.6), "fixes the sparsity"),
        (dict(method="magnitude", pattern="unstructured"), "needs sparsity"),
        (dict(method="magnitude", sparsity=1.0), r"\[0, 1\)"),
        (dict(method="cast", pattern="2:4"), "needs a calibration set"),
        (dict(method="cast", sparsity=0.5, calib="ok"), "k:n pattern"),
        (dict(method="ser", pattern="2:4"), "does not support"),
        (dict(method="hybrid", sparsity=0.6, switchh=0.5), "unknown option"),
        (dict(method="magnitude", sparsity=0.5, permute=True), "k:n pattern"),
        (dict(method="magnitude", pattern="2:4", repair="asr"), "needs a calibration set"),
        (dict(method="magnitude", pattern="2:4", repair="magic", calib="ok"), "repair must be one of"),
        (dict(method="magnitude", pattern="2:4", conv_order="srs"), "conv_order"),
        (dict(method="cast", pattern="2:4", calib="one-shot"), "one-shot"),
        (dict(method="magnitude", pattern="2:4", lipschitz={"fc9": 2.0}, calib="ok"), "unknown layers"),
        (dict(method="magnitude", pattern="2:4", lipschitz={"fc1": 2.0}), "needs a calibration set"),
        (dict(method="magnitude", keep_dense=["fc7*"]), "matches no prunable layer"),
    ],
)
def test_bad_requests_raise_before_touching_the_model(net, calib, kwargs, match):
    if kwargs.get("calib") == "ok":
        kwargs["calib"] = calib
    elif kwargs.get("calib") == "one-shot":
        kwargs["calib"] = iter(calib)
    before = state(net)
    with pytest.raises(ValueError, match=match):
        prune(net, inplace=True, progress=False, **kwargs)
    assert same(before, state(net))


def test_nan_weight_is_named_and_nothing_changes(net):
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    before = state(net)
    with pytest.raises(ValueError, match="fc1"):
        prune(net, "magnitude", "2:4", inplace=True, progress=False)
    assert all(torch.equal(before[k], v) or k == "fc1.weight" for k, v in state(net).items())


@pytest.mark.parametrize("method", ["magnitude", "rmt", "cast", "cast-conv"])
def test_kn_prune_skips_what_cannot_carry_the_pattern(net, calib, method):
    before = state(net)
    result = prune(net, method, "2:4", calib=calib, progress=False)
    assert same(before, state(net))  # a copy was pruned
    assert set(result.masks) == {"conv", "fc1", "fc2"}
    assert "3 input channels" in result.skipped["stem"]
    assert "depthwise" not in result.masks
    assert "depthwise convolution" in result.skipped["depthwise"]
    pruned = dict(result.model.named_modules())
    for name, mask in result.masks.items():
        w = pruned[name].weight
        assert mask.shape == w.shape and is_nm(mask, "2:4") and is_nm(w, "2:4")
        assert torch.all(w[~mask] == 0)
    assert torch.equal(pruned["stem"].weight, net.stem.weight)
    assert result.overall_sparsity() == pytest.approx(0.5)
    rules = {r.name: r.rule for r in result.report}
    conv_rule = {
        "magnitude": "magnitude 2:4",
        "rmt": "rmt",
        "cast": "magnitude 2:4 + refit",
        "cast-conv": "cast-conv 2:4 + refit",
    }
    assert rules["conv"] == conv_rule[method]
    assert "skipped" in result.table()


@pytest.mark.parametrize(
    "method, options",
    [("magnitude", {}), ("magnitude", {"mode": "global"}), ("ser", {}), ("hybrid", {"switch": 0.5})],
)
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_unstructured_prune_meets_the_global_target(net, calib, method, options, target):
    result = prune(net, method, sparsity=target, calib=calib, progress=False, **options)
    assert set(result.skipped) == {"depthwise"}  # grouped convs stay dense, with the reason
    assert abs(result.overall_sparsity() - target) < 1e-3


def test_report_has_mp_fit_and_certificate_when_asked(net, calib):
    asked = ks.DiagnosticsConfig(spectra=True, certificate=True, lam1=0.0, lam2=0.0)
    result = prune(net, "cast-conv", "2:4", calib=calib, progress=False, diagnostics=asked)
    for row in result.report:
        assert row.mp.sigma2 > 0 and 0 <= row.mp.bulk_fraction <= 1
        assert row.data_path_budget > 0 and row.l1_term == 0 and row.l2_term == 0
        assert row.certified is False
    payload = json.loads(result.to_json())
    assert payload["layers"][0]["mp"]["num_spikes"] >= 0
    assert payload["recipe"]["diagnostics"]["certificate"] is True
    # Not asked: neither is computed, with or without a calibration set.
    for plain in (
        prune(net, "magnitude", "2:4", progress=False),
        prune(net, "cast-conv", "2:4", calib=calib, progress=False),
    ):
        assert all(r.mp is None and r.data_path_budget is None and r.certified is None for r in plain.report)
        assert "-" in plain.table().splitlines()[2]


def test_certificate_matches_its_definition_on_a_token_mlp():
    torch.manual_seed(2)
    model = TokenMLP()
    calib = [torch.randn(4, 5, 32) for _ in range(3)]
    result = prune(model, "cast", "2:4", calib=calib, progress=False, lam1=1e3, lam2=1e3)
    x = torch.cat(calib)
    w = model.fc2.weight.detach()
    r = w - result.model.fc2.weight.detach()  # the removed part (CAST also re-fits the kept weights)
    hidden = torch.nn.functional.gelu(model.fc1(x)).detach()
    expect = 2 * (hidden @ r.T).abs().amax(dim=(1, 2)).mean()
    row = {r.name: r for r in result.report}["fc2"]
    assert row.data_path_budget == pytest.approx(float(expect), rel=1e-4)
    assert row.l2_term == pytest.approx(1e3 * float(r.square().sum()), rel=1e-5)
    assert row.l1_term == pytest.approx(1e3 * float(r.abs().sum()), rel=1e-5)
    assert row.certified  # huge regularisation: the decrease dominates the data-path budget


def test_cast_with_premask_reports_free_restoration(net, calib):
    result = prune(net, "cast-conv", "2:4", sparsity=0.8, calib=calib, progress=False)
    assert result.overall_sparsity() == pytest.approx(0.5)
    for r in result.report:  # the MP budget keeps layers too small for a fit dense: nothing to restore
        assert (r.freely_restored > 0) == (r.extra["premask_sparsity"] > 0.5)
    assert sum(r.freely_restored > 0 for r in result.report) >= 2


def test_inplace_prunes_the_given_model(net):
    reference = copy.deepcopy(net)
    result = prune(net, "magnitude", sparsity=0.5, inplace=True, progress=False)
    assert result.model is net
    assert not torch.equal(net.fc1.weight, reference.fc1.weight)
    assert torch.all(net.fc1.weight[~result.masks["fc1"]] == 0)


@pytest.mark.parametrize(
    "build, method, stem",
    [(vit_tiny_digits, "cast", "patch_embed.proj"), (resnet_tiny_digits, "cast-conv", "conv1")],
)
def test_built_in_models_prune_end_to_end(build, method, stem):
    torch.manual_seed(0)
    model = build()
    calib = [
        torch.randn(80, 1, 8, 8) for _ in range(2)
    ]  # layer4 sees 1 position per image: 160 rows for its re-fit
    result = prune(model, method, "2:4", calib=calib, progress=False)
    assert "1 input channels" in result.skipped[stem]
    assert len(result.masks) == len(result.report) > 10
    assert all(is_nm(m, "2:4") for m in result.masks.values())
    assert result.model(calib[0]).shape == (80, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["magnitude", "cast-conv"])
def test_cuda_prune_matches_cpu(net, calib, method):
    cpu = prune(net, method, "2:4", calib=calib, progress=False)
    gpu_calib = [(x.cuda(), y) for x, y in calib]
    gpu = prune(copy.deepcopy(net).cuda(), method, "2:4", calib=gpu_calib, progress=False)
    for name, mask in cpu.masks.items():
        assert gpu.masks[name].is_cuda
        # data-path scores may differ in the last float bits: allow a handful of flipped ties
        assert (gpu.masks[name].cpu() != mask).float().mean() < 0.01


def test_permute_and_repair_run_inside_prune():
    """permute=True keeps the function before masking and keeps at least as much magnitude;
    repair='asr' rescales channels without moving a single zero."""
    from knsparse.models import resnet_tiny_digits

    torch.manual_seed(0)
    model = resnet_tiny_digits().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    plain = prune(model, "magnitude", "2:4", progress=False)
    bounded = {"max_iters": 5}  # the search's options bound it (the default runs 100 iterations)
    result = prune(model, "magnitude", "2:4", calib=batches, permute=bounded, repair="asr", progress=False)
    assert result.permutation is not None and result.repair is not None and result.repair.method == "asr"
    assert result.as_dict()["permuted"] and result.as_dict()["repair"] == "asr"
    for name, mask in result.masks.items():
        assert is_nm(mask, "2:4")
        weight = result.model.get_submodule(name).weight
        assert not weight[~mask].any()  # repair folded gammas into kept weights only
    kept_plain = sum(float(plain.model.get_submodule(n).weight.detach().abs().sum()) for n in plain.masks)
    permuted_dense = prune(model, "magnitude", "2:4", calib=batches, permute=bounded, progress=False)
    kept_permuted = sum(
        float(permuted_dense.model.get_submodule(n).weight.detach().abs().sum()) for n in plain.masks
    )
    assert kept_permuted >= kept_plain - 1e-4
