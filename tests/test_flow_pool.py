"""The flow's state pool without a model: how it grows."""

from __future__ import annotations

import pytest
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


def test_a_cpu_pool_grows_its_lists_up_to_its_room_not_past_it():
    """The free lists' growth by half stops at the room the CPU tensors are made with, so a
    pool holding up to that room never makes a tensor anew (a growth copies the state; by
    half, the list passed a room of 278 blocks with 202 held). Past the room it grows as ever."""
    pool, cache = FlowPool(), FlowCache()
    pool.room = {"frames": 100}
    _call(pool, [cache], [BLOCK])
    (made,) = (t.data_ptr() for t in pool.kv.values())
    while len(cache.blocks["frames"]) < 99:  # block 0 is scratch
        _call(pool, [cache], [BLOCK])
    assert pool.blocks["frames"].size == 100
    assert [t.data_ptr() for t in pool.kv.values()] == [made]
    _call(pool, [cache], [BLOCK])
    assert pool.blocks["frames"].size > 100 and len(cache.blocks["frames"]) == 100


def test_a_cpu_pool_refused_its_room_makes_what_it_needs(monkeypatch):
    """Where the room's address space is refused (strict overcommit, ``ulimit -v``), the pool
    gives the room up and makes its tensors the size they need: its streams go on."""
    real = torch.Tensor.new_empty

    def refusing(x, *size, **kw):
        if size[2] > 500:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(x, *size, **kw)

    monkeypatch.setattr(torch.Tensor, "new_empty", refusing)
    pool, cache = FlowPool(), FlowCache()
    pool.room = {"frames": 1000}
    k, keys, _ = _call(pool, [cache], [24])
    assert not pool.room and torch.equal(keys[0, :, :24], k[0])


def test_an_idle_pool_keeps_its_tensors_for_its_hold():
    """Once nothing is held, the pool keeps its tensors for ``hold_s`` (the next burst would
    take that memory from the OS again, a page fault per page), saying it has memory to let go
    later; past the hold it shrinks."""
    pool, caches = FlowPool(), [FlowCache() for _ in range(3)]
    _call(pool, caches, [100] * 3)  # grows past its first size
    for c in caches:
        c.release()
    tensors, resets = list(pool.kv.values()), pool.resets
    _call(pool, [FlowCache()], [8])  # a new burst within the hold
    assert pool.resets == resets and list(pool.kv.values()) == tensors
    assert pool.held == 0 and pool.shrink_if_idle(drop=True) and pool.kv
    pool.used_at -= pool.hold_s
    assert not pool.shrink_if_idle(drop=True)
    assert not pool.kv and pool.resets == resets + 1


@pytest.mark.parametrize("release", [False, True])
def test_a_growing_pool_copies_only_positions_held_before(monkeypatch, release):
    """A tensor grown in a call takes the positions of blocks requests hold, not those the call
    itself just reserved (unwritten yet) nor those of requests gone: copying them touched the
    pool's memory twice, a page fault per page."""
    fills = iter(range(1, 100))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda x, *size, **kw: x.new_full(size, 1000.0 * next(fills))
    )
    pool, first, short, long = FlowPool(), FlowCache(), FlowCache(), FlowCache()
    _call(pool, [first], [24])  # blocks 1-3, in a tensor made with fill 1000
    (made,) = pool.kv.values()
    if release:
        first.release()
    _call(pool, [short, long], [20, 290])  # short: blocks 1-3 or 4-6; long grows the tensor
    (grown,) = pool.kv.values()
    assert grown.shape[2] > made.shape[2]
    tail = short.blocks["frames"][-1] * BLOCK + 20 % BLOCK  # short's unwritten positions
    assert tail + BLOCK < made.shape[2] and (grown[:, :, tail : tail + 4] == 2000.0).all()
