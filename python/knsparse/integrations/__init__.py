"""Model integrations: how knsparse recognises blocks, attention, MLPs and channel couplings in
knsparse, timm, torchvision and Hugging Face models (``families``), and the swap of
``nn.MultiheadAttention`` for a prunable twin (``mha``). The built-in architectures live in
:mod:`knsparse.models` (used by the app, the benchmarks and the tests, never by a stage)."""
