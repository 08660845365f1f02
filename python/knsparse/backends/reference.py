"""The reference backend: masked dense math on any device and dtype (no sparse speed-up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, ConvSpec, LinearSpec, activate


class ReferenceBackend(Backend):
    name = "reference"
    prepares_in_forward = True

    def unavailable_reason(self) -> str | None:
        return None

    def linear_unsupported_reason(self, spec: LinearSpec) -> str | None:
        return None

    def prepare_linear(self, dense_weight: torch.Tensor) -> torch.Tensor:
        return dense_weight

    def linear(
        self, x2d: torch.Tensor, operand: object, bias: torch.Tensor | None, activation: str = "none"
    ) -> torch.Tensor:
        assert isinstance(operand, torch.Tensor)
        return activate(F.linear(x2d, operand, bias), activation)

    def conv_unsupported_reason(self, spec: ConvSpec) -> str | None:
        return None

    def prepare_conv(self, dense_weight: torch.Tensor) -> torch.Tensor:
        return dense_weight

    def conv2d(
        self, x: torch.Tensor, operand: object, bias: torch.Tensor | None, spec: ConvSpec
    ) -> torch.Tensor:
        assert isinstance(operand, torch.Tensor)
        return F.conv2d(x, operand, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
