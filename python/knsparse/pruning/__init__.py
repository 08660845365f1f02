"""The pruning stages, in the order data flows through them.

``score`` (what matters) → ``budget`` (how many to keep) → ``methods`` (which, exactly; a method
is a scorer + a budget + a mask rule, optionally re-fitting the kept weights) → ``permutation``
(reorder channels so the masks lose less) → ``repair`` (ASR, BatchNorm) → ``finetune`` (masked
distillation). ``calibration`` streams the statistics they read, ``spectral`` fits
Marchenko–Pastur spectra on demand, and ``prune`` is the one orchestrator that strings them
together.
"""
