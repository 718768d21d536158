"""``FASTSPLIT_CUDA_TUNING=threads,items,min_blocks,max_blocks`` (what ``gpu_tune.py`` prints as best) sets the
CUDA kernel's tuning constants for a benchmark run; unset, the defaults of ``fastsplit._config`` stay."""

from __future__ import annotations

import os

from fastsplit import _config


def apply_env() -> tuple | None:
    text = os.environ.get("FASTSPLIT_CUDA_TUNING", "").strip()
    if not text:
        return None
    return apply(tuple(int(v) for v in text.split(",")))


def apply(setting: tuple) -> tuple:
    """Set ``(threads, items, min_blocks, max_blocks)``; a max of 0 means one block per tile."""
    threads, items, min_blocks, max_blocks = setting
    _config.CUDA_THREADS_PER_BLOCK = threads
    _config.CUDA_VECTORS_PER_THREAD = items
    _config.CUDA_MIN_BLOCKS_PER_SM = min_blocks
    _config.CUDA_MAX_BLOCKS = max_blocks or (1 << 24)
    return threads, items, min_blocks, max_blocks
