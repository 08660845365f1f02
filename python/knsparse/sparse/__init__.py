"""Sparse modules: ``SparseLinear`` / ``SparseConv2d`` and the swap (``modules``), activation
fusion into the sparse GEMM (``fuse``), the dense twin of a swapped model (``densify``) and the
safetensors round trip (``io``). The kernels behind them are :mod:`knsparse.backends`."""
