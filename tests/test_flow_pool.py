"""The flow's state pool without a model: how it grows."""

from __future__ import annotations

from cosyvoice.flow.cache import BLOCK, FlowCache, FlowPool


def test_a_pinned_pool_grows_by_what_is_missing_only():
    """A pool pinned under CUDA graphs is sized to its device's memory: if it must grow anyway
    it grows by the blocks missing, where half as much again would not fit on the device. A
    free pool grows by half, so that growing is rare."""
    sizes = []
    for keep in (False, True):
        pool = FlowPool()
        pool.presize({"tokens": 10, "frames": 20}, 4)  # 9 blocks free: block 0 is scratch
        pool.keep = keep
        pool.reserve(FlowCache(), "tokens", 12 * BLOCK)  # 12 blocks: 3 missing
        sizes.append(pool.blocks["tokens"].size)
    assert sizes == [15, 13]
