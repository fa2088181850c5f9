"""The flow's state pool without a model: how it grows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cosyvoice.flow.cache import BLOCK, CPU_ROOM, FlowCache, FlowPool, Past


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


def _poisoned(monkeypatch) -> None:
    """Memory the pool makes empty comes full of NaN (what is left there is any bytes)."""
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda x, *size, **kw: x.new_full(size, float("nan"), **kw)
    )


def _call(pool: FlowPool, caches: list[FlowCache], lens: list[int]):
    """One committing attention call of ``caches`` with ``lens`` new positions each: the new
    keys (= values), the keys it reads back and its output."""
    start = [c.length["frames"] for c in caches]
    past = Past(caches, start, lens, [True] * len(caches), 0, commit=[True] * len(caches),
                pool=pool)  # fmt: skip
    k = torch.randn(len(caches), 2, max(lens), 4)
    keys, values = past.kv("layer", k.expand(2, *k.shape))
    out = F.scaled_dot_product_attention(k, keys, values, attn_mask=past.bias(k.dtype))
    past.finish()
    return k, keys, out


def test_keys_past_a_requests_end_read_the_zeroed_scratch_not_garbage(monkeypatch):
    """A request's keys past its end (masked out) are read from scratch position 0, which no
    padding has written in this call: it must hold zeros, since a masked key's value is still
    multiplied by its weight 0, and 0 * NaN is NaN."""
    _poisoned(monkeypatch)
    pool, long, short = FlowPool(), FlowCache(), FlowCache()
    _call(pool, [long], [16])
    _, _, out = _call(pool, [long, short], [8, 8])  # no padding; `short` reads 16 masked keys
    assert torch.isfinite(out).all()


def test_a_growing_pool_keeps_every_position_in_use(monkeypatch):
    """Grown past the room its tensors were made with, the pool reads back every key a request
    wrote before."""
    _poisoned(monkeypatch)
    pool, caches = FlowPool(), [FlowCache() for _ in range(3)]
    written = [[] for _ in caches]
    for _ in range(12):  # 3 x 12 x 24 positions: past 4 x 8 blocks
        k, _, _ = _call(pool, caches, [24] * 3)
        for w, x in zip(written, k, strict=True):
            w.append(x)
    assert pool.blocks["frames"].size > CPU_ROOM * pool.blocks["frames"].initial
    _, keys, _ = _call(pool, caches, [1] * 3)
    for b, w in enumerate(written):
        assert torch.equal(keys[b, :, : 12 * 24], torch.cat(w, dim=1))
