"""The LLM's KV pool when blocks come back from a cache's finalizer: on whatever thread
collects the cache, at any moment, even inside the pool's own take (a cyclic collection runs
where it is triggered)."""

from __future__ import annotations

import threading

import torch

from cosyvoice.llm.kv import BLOCK, KVPool


def test_blocks_given_back_while_the_pool_is_busy_never_wait_and_come_back():
    pool = KVPool(n_layers=1, n_kv=1, head_dim=4, dtype=torch.float32, device="cpu", blocks=4)
    cache = pool.new_cache()
    cache.reserve(2 * BLOCK)
    assert pool.used_blocks == 3  # two and the scratch block
    with pool._lock:  # a take under way (here, or on another thread)
        giving = threading.Thread(target=cache.release)
        giving.start()
        giving.join(timeout=5)
        # It did not wait for the lock: a finalizer run inside take, on the thread holding
        # it, would have waited for ever.
        assert not giving.is_alive()
    assert pool.used_blocks == 1  # taken back once the lock is free
    again = pool.new_cache()
    again.reserve(3 * BLOCK)  # all three blocks there are to take, none lost
    assert pool.used_blocks == 4 and pool.blocks == 4
