"""Triton kernels of knsparse, installed as ``knsparse.kernels``.

Every kernel has a plain-PyTorch ``*_ref`` twin with the same semantics; on CPU the
library runs the reference, and the tests run the kernels with ``TRITON_INTERPRET=1``.
"""
