"""Streaming state of the flow: what a request's finished frames leave for its next chunk.

A streaming chunk of CosyVoice2/3 runs with chunk-masked attention (full left context), causal
convolutions, the fixed noise and real look-ahead tokens, so the frames of earlier chunks come out
the same however often they are recomputed. Instead of recomputing them, a request keeps a
:class:`FlowCache`: for every attention layer the keys and values of its finished positions, and
for every causal convolution the last ``k - 1`` input frames - once for the encoder, and once per
Euler step (x 2 rows: with and without the condition) for the estimator. A chunk then costs its own
frames plus attention over the past.

All requests' state lives in one :class:`FlowPool` per flow model, shaped like the LLM's paged KV
pool: per attention layer ONE key/value tensor whose positions are cut into blocks that requests
own, per convolution ONE tensor of tails indexed by request slot. A forward call's
:class:`Past` turns its ragged batch into index tensors once, so every layer does a fixed number
of tensor ops (one scatter of the new keys/values, one gather of the batch's) whatever the batch
size: on a GPU the launches of a flow call no longer grow with the number of streams.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cosyvoice.devices import h2d

log = logging.getLogger(__name__)

BLOCK = 8  # positions per block (host bookkeeping only: gathers index single positions)
RESOLUTIONS = ("tokens", "frames")  # the encoder's token layers; its frame layers + estimator
CPU_ROOM = 4  # a CPU pool tensor's positions per position its free list has (see kv_buffer)
ZERO_SLOT, SCRATCH_SLOT = 0, 1  # tails read by fresh requests (kept zero) / written by the rest
# How long an idle pool keeps its tensors (see FlowPool.shrink_if_idle). Memory a process gives
# back costs a page fault per page when taken again: on the project's 2-core VM (a microVM that
# hands freed guest memory to its host) ~19 us per page past the host's working set, more than
# the flow's own compute per token of state (9.2 MB per token in float32).
HOLD_S = 30.0


def blocks_for(positions: int) -> int:
    return -(-positions // BLOCK)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (the pool keeps the dtype of its first call; autocast may differ);
    no dispatch at all when it already is, which is every call of a steady run."""
    return x if x.dtype == dtype else x.to(dtype)


def _retire(tensors) -> None:
    """Before the pool drops its tensors: one made on another stream (the main thread's warm-up,
    a capture's) goes back to that stream's free memory, which could hand it out while this
    stream's queued kernels (the vocoder thread's) still read it; recorded, it waits for them."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))


class _Free:
    """A free list of ids from ``first`` up that grows by half when it runs out; the lowest
    ids come out first."""

    def __init__(self, first: int, size: int):
        self.first, self.initial = first, size
        self.reset()

    def reset(self) -> None:
        self.size = self.initial
        self.free = list(range(self.size - 1, self.first - 1, -1))  # pop() gives the lowest

    @property
    def used(self) -> int:
        return self.size - self.first - len(self.free)

    def take(self, n: int, exact: bool = False, stop: int = 0) -> list[int]:
        """``exact``: grow by what is missing only (a list sized to its device's memory, where
        half as much again would not fit); ``stop``: a growth by half from below this size
        goes no further than it (the room the pool's tensors were made with: past it they are
        made anew)."""
        if n > len(self.free):
            new = self.size + n - len(self.free)
            half = 3 * self.size // 2
            new = new if exact else max(new, min(half, stop) if self.size < stop else half)
            self.free = list(range(new - 1, self.size - 1, -1)) + self.free
            self.size = new
        return [self.free.pop() for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        self.free.extend(reversed(ids))  # the lowest ids come out first again


class FlowPool:
    """Every streaming request's flow state on one device.

    ``kv[key]``: (2, rows, positions, heads, head_dim) per attention layer (``key`` = the call's
    tag and the module; positions ``block * BLOCK + offset``, block 0 is scratch for padding);
    ``tails[key]``: (rows, request slots, channels, k - 1) per causal convolution. Tensors are
    made on first use and grow with the free lists; once no request has held anything for
    ``hold_s`` seconds (checked around every call, and at the caller's :meth:`shrink_if_idle`)
    they go back to their first size, so a burst does not keep its memory for long, but the next
    burst soon after does not pay to take it from the OS again. One flow call runs at a time.
    A cache garbage-collected (on any thread, even inside a free-list update) only queues its
    ids; the next bookkeeping call takes them back.
    """

    def __init__(self, blocks: int = 8, slots: int = 8):  # small: a position is ~4.6 MB (v2)
        self.lock = threading.RLock()
        self.blocks = {r: _Free(1, blocks) for r in RESOLUTIONS}
        self.slots = _Free(2, slots)
        self.kv: dict[Hashable, torch.Tensor] = {}
        self.kv_res: dict[Hashable, str] = {}  # each layer's resolution
        self.tails: dict[Hashable, torch.Tensor] = {}
        self.position_bytes = dict.fromkeys(RESOLUTIONS, 0)  # over every layer's K and V
        self.slot_bytes = 0  # over every convolution's tails
        self._known_bytes = (self.position_bytes, 0)  # the two, as before the last shrink
        self._returned: deque[tuple[dict[str, list[int]], list[int]]] = deque()
        self.bound: weakref.WeakSet[FlowCache] = weakref.WeakSet()  # caches ever bound here
        self.keep = False  # never shrink (set while CUDA graphs hold the tensors' addresses)
        self.hold_s = HOLD_S
        self.used_at = time.monotonic()  # the last reservation: when something was last held
        self.sized = False  # presized to its device's memory (see Token2Wav._size_pool)
        self.room: dict[str, int] = {}  # blocks a CPU tensor is made with, at least (kv_buffer)
        self.resets = 0

    @property
    def pinned(self) -> bool:
        """Sized to its device and held by graphs: it may not grow (it would not fit)."""
        return self.keep and self.sized

    @property
    def held(self) -> int:
        """Blocks and slots that requests hold (0 once every cache is released)."""
        with self.lock:
            self._drain()
            return sum(b.used for b in self.blocks.values()) + self.slots.used

    @property
    def layout(self) -> tuple:
        """Changes whenever a tensor may be made anew (a free list grew, the pool shrank):
        what a CUDA graph captured over the tensors must match to be replayed."""
        sizes = tuple(b.size for b in self.blocks.values())
        return sizes, self.slots.size, self.resets

    def presize(self, blocks: dict[str, int], slots: int) -> None:
        """Start at (and shrink back to) at least these sizes: graphs over the tensors stay
        valid only while the pool does not grow, so a pool under graphs is made as large as the
        memory bound lets its streams get. Empties the pool (nothing may be held)."""
        with self.lock:
            if self.held:
                raise RuntimeError("presize() needs a pool that holds nothing")
            for res, n in blocks.items():
                self.blocks[res].initial = max(self.blocks[res].initial, n)
            self.slots.initial = max(self.slots.initial, slots)
            self.sized = True
            self._shrink()

    def drop(self) -> None:
        """Let the tensors go (they are made again at the next call): what they took counts as
        free memory when the pool is sized. Nothing may be held."""
        with self.lock:
            if self.held:
                raise RuntimeError("drop() needs a pool that holds nothing")
            self._shrink()

    def free_blocks(self) -> dict[str, int]:
        """Blocks free now, per resolution (before the pool would grow)."""
        with self.lock:
            self._drain()
            return {res: len(b.free) for res, b in self.blocks.items()}

    def shrink_if_idle(self, drop: bool = False, hold: bool = True) -> bool:
        """Back to the first size when no request has held anything for ``hold_s`` seconds
        (between calls only; ``hold=False``: at once); ``drop``: the tensors go even at their
        first size (nothing is synthesizing). Returns whether the pool holds memory it will let
        go once that time has passed (call again then)."""
        if self.keep:
            return False
        with self.lock:
            lists = (*self.blocks.values(), self.slots)
            grown = any(b.size > b.initial for b in lists)
            if self.held or not (grown or drop and bool(self.kv or self.tails)):
                return False
            if hold and time.monotonic() - self.used_at < self.hold_s:
                return True
            self._shrink()
            return False

    def reserve(self, cache: FlowCache, res: str, end: int, shrink: bool = True) -> None:
        """Blocks for positions [0, end) of ``cache`` at resolution ``res``; ``shrink``: back to
        the first size first if nothing is held (a call's first reservation)."""
        with self.lock:
            if shrink:
                self.shrink_if_idle()
            self.used_at = time.monotonic()
            self._drain()  # what caches gave back is free again
            need = blocks_for(end) - len(cache.blocks[res])
            if need > 0:  # past what Token2Wav's guard foresaw, if pinned
                ids = self.blocks[res].take(need, exact=self.pinned, stop=self.room.get(res, 0))
                cache.blocks[res].extend(ids)

    def slot(self, cache: FlowCache) -> int:
        with self.lock:
            self._drain()
            if not cache.slot:
                cache.slot.extend(self.slots.take(1))
            return cache.slot[0]

    def give(self, blocks: dict[str, list[int]], slot: list[int]) -> None:
        """A cache's finalizer: queue its ids (no lock: it may run inside a locked update)."""
        self._returned.append(({r: list(ids) for r, ids in blocks.items()}, list(slot)))
        for ids in blocks.values():
            ids.clear()
        slot.clear()

    def _drain(self) -> None:  # with the lock held
        while self._returned:
            blocks, slot = self._returned.popleft()
            for res, ids in blocks.items():
                self.blocks[res].give(ids)
            self.slots.give(slot)

    def trim(self, cache: FlowCache, res: str, end: int) -> None:
        """Give back the blocks past position ``end`` (a call's positions it did not keep)."""
        with self.lock:
            ids, keep = cache.blocks[res], blocks_for(end)
            self.blocks[res].give(ids[keep:])
            del ids[keep:]

    def _shrink(self) -> None:  # between calls, when nothing is held
        for b in (*self.blocks.values(), self.slots):
            b.reset()
        _retire([*self.kv.values(), *self.tails.values()])
        self.kv.clear()
        self.tails.clear()
        self.resets += 1
        if any(self.position_bytes.values()):  # the layers stay as they were: for bytes_for
            self._known_bytes = (self.position_bytes, self.slot_bytes)
        self.position_bytes = dict.fromkeys(RESOLUTIONS, 0)
        self.slot_bytes = 0

    def bytes_for(self, tokens: int, frames: int) -> int:
        """What a copy of a cache with these positions takes (0 before the first call: the
        pool does not know its layers yet)."""
        pb, sb = self.position_bytes, self.slot_bytes
        if not any(pb.values()):  # shrunk since
            pb, sb = self._known_bytes
        return sb + tokens * pb["tokens"] + frames * pb["frames"]

    def _positions(self, cache: FlowCache, res: str, n: int, device) -> torch.Tensor:
        """Where positions [0, n) of ``cache`` live in the layers' tensors."""
        j = torch.arange(n)
        ids = torch.tensor(cache.blocks[res][: blocks_for(len(j))], dtype=torch.long)
        return h2d(ids[j // BLOCK] * BLOCK + j % BLOCK, device)

    def snapshot(self, cache: FlowCache) -> CachedPrompt:
        """A copy of everything ``cache`` holds (its positions in every layer, its tails)."""
        with self.lock:
            if not cache.slot:
                raise ValueError("snapshot() of a cache that holds nothing")
            at: dict[str, torch.Tensor] = {}
            kv = {}
            for key, buf in self.kv.items():
                res = self.kv_res[key]
                if res not in at:
                    at[res] = self._positions(cache, res, cache.length[res], buf.device)
                kv[key] = buf.index_select(2, at[res])
            tails = {key: buf[:, cache.slot[0]].clone() for key, buf in self.tails.items()}
        return CachedPrompt(cache.tokens, dict(cache.length), kv, tails)

    def restore(self, saved: CachedPrompt, cache: FlowCache) -> None:
        """Give an empty ``cache`` the state ``saved`` holds, in blocks and a slot of its own
        (as if it had made that state itself). If a copy fails, the cache still holds nothing
        (a call then computes everything, and the blocks it took go back as usual)."""
        with self.lock:
            cache.bind(self)
            if cache.tokens or cache.slot:
                raise ValueError("restore() into a cache that holds state")
            for res, n in saved.length.items():  # (shrunk first, the pool would grow again:
                self.reserve(cache, res, n, shrink=False)  # 10 s for 2 GB on a 2-core VM)
            at: dict[str, torch.Tensor] = {}
            for key, data in saved.kv.items():
                res = self.kv_res[key]
                like = data[0, :, :1].transpose(1, 2)  # (rows, H, 1, dh)
                buf = self.kv_buffer(key, res, like, data.shape[1])
                if res not in at:
                    at[res] = self._positions(cache, res, saved.length[res], buf.device)
                buf.index_copy_(2, at[res], data)
            slot = self.slot(cache)
            for key, data in saved.tails.items():
                self.tails_buffer(key, data, data.shape[0], data.shape[-1])[:, slot] = data
            cache.length, cache.tokens = dict(saved.length), saved.tokens

    def kv_buffer(self, key: Hashable, res: str, k: torch.Tensor, rows: int) -> torch.Tensor:
        """Layer ``key``'s (2, rows, positions, H, dh) tensor, grown to the free list's size.

        Made empty: a position is read only after it is written, except block 0's (padding's
        reads and writes), zeroed here - masked out, it is still multiplied by 0. In the CPU's
        memory, where a page costs nothing until it is first written, a tensor is made with
        room for :attr:`room`'s blocks (what the owner's memory bound lets requests hold, see
        ``Token2Wav.reserve_room``), and at least ``CPU_ROOM`` times the size it needs, so that
        the list's growth seldom copies: a full CosyVoice2's position is 4.6 MB, and zeroing
        and copying a whole pool at every growth by half took a quarter of eight streams'
        time. A copy takes the used positions only."""
        self.kv_res[key] = res
        n = self.blocks[res].size * BLOCK
        t = self.kv.get(key)
        if t is None or t.shape[2] < n or t.device != k.device:
            grown = self._empty(k, rows, n, res)
            if t is None:
                self.position_bytes[res] += grown[:, :, 0].numel() * grown.element_size()
                grown[:, :, :BLOCK].zero_()
            else:  # (from another device too: the positions in use move with it)
                used = min(t.shape[2], self._kept_end(res))
                grown[:, :, :used] = t[:, :, :used]
                _retire([t])
            self.kv[key] = t = grown
        return t

    def _empty(self, k: torch.Tensor, rows: int, n: int, res: str) -> torch.Tensor:
        """A (2, rows, positions, H, dh) tensor for ``n`` positions, with room on the CPU (see
        :meth:`kv_buffer`). Where the room's address space is refused (strict overcommit,
        ``ulimit -v``), the pool gives the room up and makes what it needs."""

        def empty(positions: int) -> torch.Tensor:
            return k.new_empty(2, rows, positions, k.shape[1], k.shape[-1])

        if k.device.type != "cpu":
            return empty(n)
        try:
            return empty(max(CPU_ROOM * n, self.room.get(res, 0) * BLOCK))
        except RuntimeError:
            if not self.room:
                raise
            log.warning("flow pool: no address space for its room; its tensors grow instead")
            self.room = {}
            return empty(CPU_ROOM * n)

    def _kept_end(self, res: str) -> int:
        """One past the highest position (block 0's at least) of state a request keeps: what a
        tensor's growth copies. Not a call's new positions, unwritten yet, nor those of
        requests gone (copying them took the pool's memory twice over)."""
        with self.lock:
            caches = list(self.bound)
        kept = [max(c.blocks[res][: blocks_for(c.length[res])], default=0) for c in caches]
        return (max(kept, default=0) + 1) * BLOCK

    def tails_buffer(self, key: Hashable, x: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        """Convolution ``key``'s (rows, slots, C, n) tensor, grown to the slot list's size."""
        t = self.tails.get(key)
        if t is None or t.shape[1] < self.slots.size or t.device != x.device:
            grown = x.new_zeros(rows, self.slots.size, x.shape[1], n)
            if t is None:
                self.slot_bytes += grown[:, 0].numel() * grown.element_size()
            elif t.device == x.device:
                grown[:, : t.shape[1]] = t
                _retire([t])
            self.tails[key] = t = grown
        return t


@dataclass(eq=False)
class CachedPrompt:
    """A copy of a cache's state (:meth:`FlowPool.snapshot`): per attention layer its keys and
    values (2, rows, positions, H, dh), per convolution its tails (rows, C, k - 1)."""

    tokens: int
    length: dict[str, int]
    kv: dict[Hashable, torch.Tensor]
    tails: dict[Hashable, torch.Tensor]
    nbytes: int = 0

    def __post_init__(self) -> None:
        tensors = [*self.kv.values(), *self.tails.values()]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


class PromptStore:
    """Speakers' prompts as a stream's flow state begins with them, by content key, within
    ``budget`` bytes (the least recently used go first). A zero-shot speaker's prompt is most of
    a stream's first flow call (a 3 s prompt is 75 tokens, the first hop 25-50): computed once,
    each later stream copies it in and computes only its own frames. A prompt is kept from its
    second stream on (:meth:`admit`), so one-off prompts (upstream's per-request recordings)
    neither cost a copy nor push speakers out. Used inside flow calls only (one at a time)."""

    SEEN = 4096  # prompt keys remembered for admission (20 bytes each)

    def __init__(self, budget: float = 0.0) -> None:
        self._saved: OrderedDict[bytes, CachedPrompt] = OrderedDict()
        self._seen: OrderedDict[bytes, bool] = OrderedDict()  # key -> may be kept
        self.nbytes = 0  # of what it keeps
        self.hits = self.misses = 0
        self.budget = budget

    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        """Lowered, it pushes the least recently used out until what it keeps fits (0: the
        store is off, and streams compute their prompts)."""
        self._budget = value
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self._budget:
            self.nbytes -= self._saved.popitem(last=False)[1].nbytes

    def admit(self, key: bytes) -> bool:
        """Whether to keep this prompt: it was seen before and not refused (:meth:`refuse`),
        and the store may keep anything."""
        if self.budget <= 0:
            return False
        ok = self._seen.get(key)
        self._seen[key] = ok is not False
        self._seen.move_to_end(key)
        if len(self._seen) > self.SEEN:
            self._seen.popitem(last=False)
        return bool(ok)

    def refuse(self, key: bytes) -> None:
        """Not to be kept (too large for the budget): later streams do not try again."""
        self._seen[key] = False

    def __len__(self) -> int:
        return len(self._saved)

    def __contains__(self, key: bytes) -> bool:  # neither a hit nor a use
        return key in self._saved

    def get(self, key: bytes) -> CachedPrompt | None:
        saved = self._saved.get(key)
        if saved is None:
            self.misses += 1
            return None
        self.hits += 1
        self._saved.move_to_end(key)
        return saved

    def put(self, key: bytes, saved: CachedPrompt) -> None:
        if saved.nbytes > self.budget:
            self.refuse(key)
            return
        old = self._saved.pop(key, None)
        self.nbytes += saved.nbytes - (old.nbytes if old else 0)
        self._saved[key] = saved
        self._evict()

    def has_room(self, nbytes: int) -> bool:
        """Whether this much more fits without pushing anything out."""
        return self.nbytes + nbytes <= self.budget

    def discard(self, key: bytes) -> bool:
        """Forget a prompt (its speaker was deleted), as if never seen: a speaker made from the
        same recording has it kept again from its second stream. Whether it was kept."""
        self._seen.pop(key, None)
        old = self._saved.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        return old is not None

    def clear(self) -> None:
        self._saved.clear()
        self._seen.clear()
        self.nbytes = self.hits = self.misses = 0


class FlowCache:
    """One request's flow state: the pool blocks holding its positions at each resolution, its
    tails slot, and ``tokens``, the positions (prompt included) whose encoder output and
    estimator frames are final and cached (mel frames are ``tokens * token_mel_ratio``).
    Bound to a flow's pool on first use; the blocks go back on :meth:`release` or when the
    cache is garbage-collected."""

    def __init__(self) -> None:
        self.tokens = 0
        self.pool: FlowPool | None = None
        self.blocks: dict[str, list[int]] = {r: [] for r in RESOLUTIONS}
        self.slot: list[int] = []
        self.length = dict.fromkeys(RESOLUTIONS, 0)  # cached positions per resolution
        # its prompt's part, once computed, goes to the prompt store (FlowModel.prompt_piece)
        self.keep_prompt = False
        self._finalizer: weakref.finalize | None = None

    def bind(self, pool: FlowPool) -> None:
        if self.pool is None:
            self.pool = pool
            self._finalizer = weakref.finalize(self, pool.give, self.blocks, self.slot)
            with pool.lock:
                pool.bound.add(self)
        elif self.pool is not pool:
            raise ValueError("this flow cache belongs to another flow model")

    def release(self) -> None:
        """Give everything back to the pool (idempotent); the cache starts over empty."""
        if self._finalizer is not None:
            self._finalizer()
        self.pool, self._finalizer, self.tokens, self.keep_prompt = None, None, 0, False
        self.length = dict.fromkeys(RESOLUTIONS, 0)

    @property
    def nbytes(self) -> int:
        """Pool memory this request holds (whole blocks)."""
        if self.pool is None:
            return 0
        held = self.pool.slot_bytes if self.slot else 0
        return held + sum(
            len(ids) * BLOCK * self.pool.position_bytes[r] for r, ids in self.blocks.items()
        )


class Past:
    """A forward call's view of its batch's caches at one resolution (``res``).

    Rows are ``rows`` groups of ``B`` requests (row ``j * B + b`` belongs to request ``b``; the
    estimator has 2 groups: conditional and unconditional). Request ``b``'s new positions are
    ``[start[b], start[b] + lens[b])``, right-padded to ``T = max(lens)``; keys are indexed by
    absolute position and right-padded to ``max(start + lens)``. ``chunk`` > 0 gives streaming
    requests chunk-masked attention (position i sees j < (i // chunk + 1) * chunk).

    When any request reads or keeps state, every request's new positions get pool blocks for
    the call (those it does not keep go back in :meth:`finish`), and each layer writes its new
    keys to the pool and reads all of them back through the same two index tensors."""

    def __init__(
        self,
        caches: list[FlowCache],
        start: list[int],
        lens: list[int],
        streaming: list[bool],
        chunk: int,
        rows: int = 1,
        commit: list[bool] | None = None,
        device: torch.device | str = "cpu",
        tag: Hashable = None,
        pool: FlowPool | None = None,
        res: str = "frames",
        pooled: bool = False,
    ):
        """``pooled``: through the pool even if no request reads or keeps state (a call that
        replays a CUDA graph: the graphs read every call's keys through the pool)."""
        self.caches, self.start, self.lens, self.rows, self.tag = caches, start, lens, rows, tag
        self.commit = commit or [False] * len(caches)
        self.pool, self.res = pool, res
        self.ends = [s + n for s, n in zip(start, lens, strict=True)]
        s = h2d(start, device)
        q = torch.arange(max(lens), device=device)
        j = torch.arange(max(self.ends), device=device)
        pos = s[:, None] + q[None, :]  # (B, T) absolute positions of the queries
        m = j[None, None, :] < h2d(self.ends, device)[:, None, None]
        if chunk > 0:
            seen = j[None, None, :] < ((pos // chunk + 1) * chunk)[..., None]
            m = m & (seen | ~h2d(streaming, device)[:, None, None])
        self.lens_dev = h2d(lens, device)
        padded = q[None, :] >= self.lens_dev[:, None]
        m = m | padded[..., None] & (j == 0)  # padding rows see one key: no empty softmax
        self.mask = m.repeat(rows, 1, 1)[:, None]  # (rows*B, 1, T, K) bool, True = attend
        self.positions = pos.repeat(rows, 1)  # (rows*B, T)
        self.valid = (~padded).repeat(rows, 1)  # (rows*B, T)
        self._rel: tuple[torch.Tensor, torch.Tensor] | None = None
        self._span: tuple[int, int] | None = None  # (keys, queries) of a static view
        self._tail_idx: dict[int, torch.Tensor] = {}
        self._bias: dict[torch.dtype, torch.Tensor] = {}
        self.pooled = pooled or self._reused()
        if self.pooled:
            self._index(device)

    @classmethod
    def over(
        cls, pool: FlowPool, rows: int, mask: torch.Tensor, write: torch.Tensor,
        read: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor], lens: torch.Tensor,
        positions: torch.Tensor, valid: torch.Tensor, res: str = "frames",
        tag: Hashable = None,
    ) -> Past:  # fmt: skip
        """A pooled view over index tensors built elsewhere (the flow's CUDA graphs read them
        from static buffers): ``mask`` (rows*B, 1, T, K), ``write`` (B*T,), ``read`` (B, K),
        ``slots`` (in, out) (B,) each, ``lens`` (B,), ``positions`` and ``valid`` (rows*B, T);
        ``res`` and ``tag`` as the dynamic view's, whose state it reads and writes. It owns no
        caches: :meth:`finish` is the call's own view's."""
        p = cls.__new__(cls)
        p.caches, p.start, p.lens, p.ends, p.commit = [], [], [], [], []
        p.pool, p.res, p.rows, p.tag, p.pooled = pool, res, rows, tag, True
        p.mask, p.write, p.read, p.lens_dev = mask, write, read, lens
        p.positions, p.valid = positions, valid
        p.slots_in, p.slots_out = slots
        p._rel, p._tail_idx, p._bias = None, {}, {}
        p._span = (read.shape[-1], positions.shape[-1])
        return p

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as SDPA's additive bias, made once per call and dtype and shared by the
        Euler steps' views: SDPA would turn the bool mask into one in every attention layer
        of every step (560 times per CosyVoice2 flow call). Its rows are laid out 8 apart:
        the GPU's memory-efficient kernel copies a bias whose rows are not."""
        if (b := self._bias.get(dtype)) is None:
            *rows, k = self.mask.shape
            b = torch.zeros(*rows, -(-k // 8) * 8, dtype=dtype, device=self.mask.device)
            b = self._bias[dtype] = b[..., :k].masked_fill_(~self.mask, float("-inf"))
        return b

    def at(self, tag: Hashable) -> Past:
        """The same view keyed apart (one per Euler step: each step has its own state)."""
        p = copy.copy(self)
        p.tag = tag
        return p

    def _reused(self) -> bool:
        """Whether any request reads or keeps state; if not, keys are the new positions."""
        return any(self.start) or any(self.commit)

    def _index(self, device: torch.device | str) -> None:
        """Pool blocks for the call and, once per call, where each position lives in the pool:
        ``write`` (B*T,) for the new positions (padding -> scratch), ``read`` (B, K) for every
        position up to each request's end (or a slice when one request's blocks are in order),
        and the tails slots each request reads and writes."""
        pool = self.pool
        if pool is None:
            raise ValueError("a flow call over caches needs the flow's pool")
        for c, s, e in zip(self.caches, self.start, self.ends, strict=True):
            c.bind(pool)
            if s != c.length[self.res]:  # a caller skipped or repeated a chunk
                raise RuntimeError(f"flow cache holds {c.length[self.res]} positions, "
                                   f"the call starts at {s}")  # fmt: skip
            pool.reserve(c, self.res, e)
        t, k = max(self.lens), max(self.ends)
        table = torch.zeros(len(self.caches), blocks_for(k), dtype=torch.long)
        for b, c in enumerate(self.caches):
            ids = c.blocks[self.res][: blocks_for(self.ends[b])]
            table[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        j = torch.arange(k)
        read = table[:, j // BLOCK] * BLOCK + j % BLOCK  # (B, K)
        read[j[None, :] >= torch.tensor(self.ends)[:, None]] = 0
        pos = torch.tensor(self.start)[:, None] + torch.arange(t)[None, :]  # (B, T)
        write = read.gather(1, pos.clamp(max=k - 1))
        write[torch.arange(t)[None, :] >= torch.tensor(self.lens)[:, None]] = 0
        self.write = h2d(write.flatten(), device)
        self.read: torch.Tensor | slice = h2d(read, device)
        if len(self.caches) == 1 and bool((read[0, 1:] - read[0, :-1] == 1).all()):
            self.read = slice(int(read[0, 0]), int(read[0, 0]) + k)  # no gather copy
        slots_in = [pool.slot(c) if s else ZERO_SLOT
                    for c, s in zip(self.caches, self.start, strict=True)]  # fmt: skip
        slots_out = [pool.slot(c) if keep else SCRATCH_SLOT
                     for c, keep in zip(self.caches, self.commit, strict=True)]  # fmt: skip
        self.slots_in, self.slots_out = h2d(slots_in, device), h2d(slots_out, device)

    def finish(self, ok: bool = True) -> None:
        """After the call: the committing requests keep their new positions, the others (all
        of them if the call failed) give back what the call reserved for them."""
        if not self.pooled:
            return
        for c, e, keep in zip(self.caches, self.ends, self.commit, strict=True):
            if keep and ok:
                c.length[self.res] = e
            elif c.pool is not None:
                c.pool.trim(c, self.res, c.length[self.res])

    def kv(self, mod: object, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every position up to each request's end, each (rows*B, H, K, dh),
        for the new ones ``new`` (2, rows*B, H, T, dh), which are stored in the pool. Best a
        view of the attention's projection (any strides; its rows in (B, T) order): then one
        kernel stores them, where two copies and two index_copy_ did."""
        if not self.pooled:  # fresh requests only: the keys are the new positions
            return new[0], new[1]
        buf = self.pool.kv_buffer((self.tag, mod), self.res, new[0], self.rows)
        x = new.transpose(2, 3).reshape(2, self.rows, -1, *new.shape[2:3], new.shape[-1])
        buf[:, :, self.write] = _as(x, buf.dtype)  # (2, rows, B*T, H, dh)
        if isinstance(self.read, slice):
            kv = buf[:, :, self.read].unsqueeze(2)  # (2, rows, B, K, H, dh)
        else:  # whole positions at once (buf[:, :, read] copied element by element: 1.9x)
            kv = buf.index_select(2, self.read.flatten()).unflatten(2, self.read.shape)
        kv = _as(kv.transpose(3, 4).flatten(1, 2), new.dtype)
        return kv[0], kv[1]

    def conv(self, mod: object, x: torch.Tensor, n: int) -> torch.Tensor:
        """x (rows*B, C, T) with the ``n`` input frames before each request's new ones prepended
        (zeros at the start of an utterance, like the convolution's own left padding)."""
        if n == 0:
            return x
        if not self.pooled:
            return F.pad(x, (n, 0))
        buf = self.pool.tails_buffer((self.tag, mod), x, self.rows, n)
        xx = torch.cat([_as(buf[:, self.slots_in].flatten(0, 1), x.dtype), x], -1)
        idx = self._tail_idx.get(n)
        if idx is None:  # the n frames before each request's end: xx[:, :, lens[b]:lens[b]+n]
            ends = self.lens_dev.repeat(self.rows)  # (rows*B,)
            idx = self._tail_idx[n] = (ends[:, None] + torch.arange(n, device=x.device))[:, None]
        new = xx.gather(-1, idx.expand(-1, x.shape[1], -1))
        buf.index_copy_(1, self.slots_out, _as(new.view(self.rows, -1, *new.shape[1:]), buf.dtype))
        return xx

    def rel_pos(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The conformer's relative-position inputs: a sinusoidal table of every offset i - j
        from ``max(end) - 1`` down to ``-(T - 1)`` (the rows of the whole-sequence table that
        the call needs; a static view's: of its whole span), and the (rows*B, T, K) index of
        each query/key pair in it. Made on the device: a static view's, in a CUDA graph."""
        if self._rel is None or self._rel[0].shape[-1] != d:
            k, t = self._span or (max(self.ends), max(self.lens))
            hi, lo, dev = k - 1, -(t - 1), self.positions.device
            f32 = dict(dtype=torch.float32, device=dev)
            pos = torch.arange(hi, lo - 1, -1, **f32)[:, None]
            angle = pos * torch.exp(torch.arange(0, d, 2, **f32) * -(math.log(10000.0) / d))
            table = torch.stack((angle.sin(), angle.cos()), -1).flatten(-2)  # sin, cos, sin...
            idx = hi - (self.positions[..., None] - torch.arange(k, device=dev))
            self._rel = (table, idx.clamp(0, hi - lo))
        return self._rel


@dataclass
class EncoderInputs:
    """A call's encoder inputs: tokens (B, T + look-ahead) and where they are real (B, T +
    look-ahead, 1), whether each has look-ahead tokens (B,), the views at token and (v2) at
    frame rate, and each request's new frames (host ints)."""

    toks: torch.Tensor
    valid: torch.Tensor
    has_ctx: torch.Tensor
    tok: Past
    frm: Past | None
    frames: list[int]
