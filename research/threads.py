"""torch thread settings for the analyses."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """Run the block on one intra-op thread and restore the caller's setting afterwards: the
    analyses' problems are small, and on a shared machine extra threads only add contention."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
