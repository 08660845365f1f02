"""Issue 13 class 2: a file is checked whole before the model changes; a bad one raises a
``ValueError`` naming the file (and the tensor), and the model stays exactly as it was."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from untouched import assert_same, snapshot

import knsparse as ks
from knsparse.sparse.io import _META_KEY
from knsparse.sparse.modules import sparse_layers


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def fresh() -> nn.Module:
    torch.manual_seed(1)
    model = Tiny()
    model.head.weight.requires_grad_(False)  # flags the load must keep
    model.bn.eval()
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = Tiny()
    masks = {n: ks.nm_mask(model.get_submodule(n).weight.abs(), "2:4") for n in ("conv", "fc", "head")}
    ks.swap_modules(model, masks)
    path = tmp_path_factory.mktemp("io") / "tiny.safetensors"
    ks.save_sparse(model, path)
    return str(path)


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def rewrite(src: str, dst, tensors=None, meta=None) -> str:
    t, m = read(src)
    save_file(tensors(t) if tensors else t, str(dst), metadata=meta(m) if meta else m)
    return str(dst)


def set_item(key: str, index: tuple, value, dtype=None):
    def edit(t):
        t[key] = t[key].clone() if dtype is None else t[key].to(dtype)
        t[key][index] = value
        return t

    return edit


def edit_layer(layer: str, **fields):
    def edit(m):
        layers = json.loads(m[_META_KEY])
        layers[layer].update(fields)
        return {**m, _META_KEY: json.dumps(layers)}

    return edit


CASES = {
    "repeated slot": (dict(tensors=set_item("fc.slots", (0, 1), 0)), "fc.slots.*repeat"),
    "slot >= n": (dict(tensors=set_item("conv.slots", (2, 3), 7)), "conv.slots.*>= n=4"),
    "nan value": (dict(tensors=set_item("fc.values", (1, 1), float("nan"))), "fc.values.*NaN"),
    "inf bias": (dict(tensors=set_item("head.bias", (0,), float("inf"))), "head.bias.*NaN or Inf"),
    "wrong dtype": (dict(tensors=set_item("fc.values", (0, 0), 1.0, torch.float64)), "fc.values.*float64"),
    "wrong shape": (
        dict(tensors=lambda t: {**t, "fc.values": torch.zeros(8, 6)}),
        "fc.values: file \\(8, 6\\)",
    ),
    "missing tensor": (
        dict(tensors=lambda t: {k: v for k, v in t.items() if k != "bn.running_var"}),
        "missing",
    ),
    "broken json": (dict(meta=lambda m: {**m, _META_KEY: "{not json"}), "not valid JSON"),
    "json not object": (dict(meta=lambda m: {**m, _META_KEY: "[1, 2]"}), "JSON object"),
    "bad kind": (dict(meta=edit_layer("fc", kind="lstm")), "kind 'lstm'"),
    "bad pattern": (dict(meta=edit_layer("fc", pattern="5:4")), "layer 'fc'.*5:4"),
    "unstructured": (dict(meta=edit_layer("fc", pattern="unstructured")), "layer 'fc'.*k:n"),
    "bad conv order": (dict(meta=edit_layer("conv", conv_order="xyz")), "conv_order 'xyz'"),
    "bad activation": (dict(meta=edit_layer("conv", activation="gelu")), "activation 'gelu'"),
    "bad backend": (dict(meta=edit_layer("fc", backend="fast")), "backend 'fast'"),
    "extra field": (dict(meta=edit_layer("fc", colour="red")), "fields"),
    "unknown layer": (dict(meta=lambda m: {**m, _META_KEY: json.dumps({"nope": {}})}), "nope"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_names_file_and_tensor_and_changes_nothing(case, saved, tmp_path):
    edits, message = CASES[case]
    path = rewrite(saved, tmp_path / "bad.safetensors", **edits)
    model = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as err:
        ks.load_sparse(model, path)
    assert path in str(err.value)
    assert_same(before, snapshot(model))


def test_unreadable_files(saved, tmp_path):
    data = Path(saved).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps(load_file(saved)))
    torch_saved = tmp_path / "torch.safetensors"
    torch.save(load_file(saved), torch_saved)
    for path in (truncated, pickled, torch_saved, tmp_path / "absent.safetensors", tmp_path):
        model = fresh()
        before = snapshot(model)
        with pytest.raises(ValueError, match=str(path)):
            ks.load_sparse(model, path)
        assert_same(before, snapshot(model))


def test_valid_file_loads_exactly(saved):
    model = ks.load_sparse(fresh(), saved)
    tensors, _ = read(saved)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    assert model.head.bias.requires_grad  # the dense bias required grad: kept
    assert model.bn.training is False


def _corrupt(data: bytes, how: tuple) -> bytes:
    kind, where, value = how
    if kind == "byte":
        i = int(where * (len(data) - 1))
        return data[:i] + bytes([value % 256]) + data[i + 1 :]
    return data[: int(where * len(data))]  # truncate


CORRUPTION = st.one_of(
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("byte-header"), st.floats(0, 1), st.integers(32, 126)),
    st.tuples(
        st.just("tensor"),
        st.integers(0, 100),
        st.sampled_from([float("nan"), float("inf"), -1.5, 0.0, 1.0, 2.0, 3.0, 4.0, 7.0, 255.0, 1e30]),
    ),
    st.tuples(
        st.just("field"),
        st.sampled_from(["kind", "pattern", "conv_order", "backend", "activation"]),
        st.sampled_from(
            ["", "2:4", "4:8", "1:4", "crs", "rsc", "auto", "linear", "conv2d", "relu", "none", "x"]
        ),
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=CORRUPTION, seed=st.integers(0, 2**16))
def test_random_corruption_raises_clearly_or_loads_exactly(how, seed, saved, tmp_path):
    path = tmp_path / "corrupt.safetensors"
    kind = how[0]
    if kind in ("byte", "truncate"):
        path.write_bytes(_corrupt(Path(saved).read_bytes(), how))
    elif kind == "byte-header":
        data = Path(saved).read_bytes()
        header = int.from_bytes(data[:8], "little")
        i = 8 + int(how[1] * (header - 1))
        path.write_bytes(data[:i] + bytes([how[2]]) + data[i + 1 :])
    elif kind == "tensor":
        tensors, _ = read(saved)
        key = sorted(tensors)[how[1] % len(tensors)]
        flat = tensors[key].clone().reshape(-1)
        if flat.numel():
            gen = torch.Generator().manual_seed(seed)
            i = int(torch.randint(flat.numel(), (1,), generator=gen))
            flat[i] = how[2] if flat.is_floating_point() else int(min(how[2], 255)) if how[2] == how[2] else 0
        rewrite(saved, path, tensors=lambda t: {**t, key: flat.reshape(t[key].shape)})
    else:
        layer = ["conv", "fc", "head"][seed % 3]
        rewrite(saved, path, meta=edit_layer(layer, **{how[1]: how[2]}))
    model = fresh()
    before = snapshot(model)
    try:
        ks.load_sparse(model, path)
    except ValueError as err:
        assert str(path) in str(err)
        assert_same(before, snapshot(model))
        return
    tensors, meta = read(str(path))
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    layers = sparse_layers(model)
    for name, info in json.loads(meta[_META_KEY]).items():
        assert str(layers[name].pattern) == info["pattern"]
        assert layers[name].conv_order == info["conv_order"]
        # what loaded is a valid k:n layer: its dense weight round-trips through its slots
        assert torch.equal(layers[name].mask().sum(), torch.tensor(layers[name].values.numel()))


def test_save_refuses_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        ks.save_sparse(fresh(), tmp_path)
