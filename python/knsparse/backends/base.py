"""The interface every execution backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..core.pattern import Pattern
from ..ops.gemm import ACTIVATIONS, activate

__all__ = ["ACTIVATIONS", "Backend", "BackendUnavailableError", "ConvSpec", "LinearSpec", "activate"]


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here, or cannot run this layer."""


@dataclass(frozen=True)
class LinearSpec:
    """What a backend needs to know to accept a Linear layer (``weight [out, in]``)."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    pattern: Pattern
    device: torch.device


@dataclass(frozen=True)
class ConvSpec:
    """What a backend needs to know to accept a Conv2d layer (``weight [Cout, Cin, R, S]``)."""

    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    dtype: torch.dtype
    pattern: Pattern
    device: torch.device


class Backend(ABC):
    """A way to execute k:n sparse Linear and Conv2d layers.

    ``prepare_*`` turns the dense masked weight into the backend's operand once;
    ``linear`` / ``conv2d`` run the layer with it.
    """

    name: str = ""
    prepares_in_forward: bool = False
    """True when ``prepare_*`` is plain tensor math cheap enough to run inside every forward
    (and traceable by ``torch.compile``): the module then caches no operand at all."""

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """``None`` if usable on this machine, else why not."""

    @abstractmethod
    def linear_unsupported_reason(self, spec: LinearSpec) -> str | None:
        """``None`` if this backend executes ``spec``, else why not."""

    @abstractmethod
    def prepare_linear(self, dense_weight: torch.Tensor) -> object:
        """The backend's operand for the dense masked weight ``[out, in]``."""

    @abstractmethod
    def linear(
        self, x2d: torch.Tensor, operand: object, bias: torch.Tensor | None, activation: str = "none"
    ) -> torch.Tensor:
        """``activation(x2d [M, in] times the operand + bias)``: ``[M, out]``; ``activation`` one
        of :data:`ACTIVATIONS`, fused where the backend's kernel can."""

    @abstractmethod
    def conv_unsupported_reason(self, spec: ConvSpec) -> str | None:
        """``None`` if this backend executes ``spec``, else why not."""

    @abstractmethod
    def prepare_conv(self, dense_weight: torch.Tensor) -> object:
        """The backend's operand for the dense masked weight ``[Cout, Cin, R, S]``."""

    @abstractmethod
    def conv2d(
        self, x: torch.Tensor, operand: object, bias: torch.Tensor | None, spec: ConvSpec
    ) -> torch.Tensor:
        """``x [B, Cin, H, W]`` convolved with the operand: ``[B, Cout, H', W']``."""
