"""Small utilities below every stage: the cache folder, provenance of measurements, training-flag
bookkeeping (``modes``), calibration batches (``batches``), torch.distributed helpers and timing."""
