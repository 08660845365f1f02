"""The "model untouched" check of issue 13: state, module types, per-module training flags and
requires_grad, as they were before a call that failed."""

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["types"] == b["types"] and a["training"] == b["training"] and a["grad"] == b["grad"]
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
