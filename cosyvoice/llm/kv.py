"""Paged KV cache shared by every request, and the ragged-batch layout of one forward.

All requests' keys and values live in ONE tensor per model (``KVPool.data``), cut into blocks of
``BLOCK`` positions, as in vLLM/nano-vllm. A request owns a list of blocks (:class:`KVCache`).
A forward over a ragged batch builds its :class:`Layout` once (host-side bookkeeping: where
each new token is written, which blocks each request reads, the mask), and then every layer
does a constant number of tensor ops whatever the batch size: one scatter of the new keys and
values, one gather of the batch's blocks, one attention call per group of requests (decode
rows and prefill rows are two groups, so a long prefill does not pad every decode row).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BLOCK = 32  # positions per block: small enough to waste little, big enough for few indices

Tensors = tuple[torch.Tensor, torch.Tensor]


def blocks_for(positions: int) -> int:
    """How many blocks hold ``positions`` positions."""
    return -(-positions // BLOCK)


def slot(blocks: list[int], pos: int) -> int:
    """Where position ``pos`` of a request owning ``blocks`` sits in the pool."""
    return blocks[pos // BLOCK] * BLOCK + pos % BLOCK


def table_row(blocks: list[int], n: int) -> list[int]:
    """A request's first ``n`` blocks, padded with the scratch block 0 (masked out)."""
    row = blocks[:n]
    return row + [0] * (n - len(row))


KeysOf = Callable[["Group"], Tensors]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Group"], torch.Tensor]


class KVPool:
    """``data[layer, 0=k/1=v, slot, kv_head, head_dim]`` with ``slot = block * BLOCK + offset``.

    On the CPU the pool grows (doubling) when it runs out of blocks, and goes back to its first
    size when no request holds a block, so a burst does not keep its memory. ``fixed=True`` (CUDA graphs
    read ``data`` at a captured address) makes running out an error instead. Block 0 is never
    handed out: padded rows of a static batch write there and attend to it alone.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        blocks: int = 64,
        fixed: bool = False,
    ) -> None:
        self.data = torch.zeros(
            n_layers, 2, blocks * BLOCK, n_kv, head_dim, dtype=dtype, device=device
        )
        self.fixed = fixed
        self._initial = blocks
        if blocks < 2:
            raise ValueError("a KV pool needs at least 2 blocks (block 0 is scratch)")
        self._free = list(range(blocks - 1, 0, -1))  # pop() hands out the lowest block first
        # A cache's blocks may come back from its finalizer, on whatever thread collects it
        # (a cyclic collection runs on any, even inside take on this one): they are queued,
        # and taken back by whoever holds the lock, never while another thread takes or grows.
        self._lock = threading.Lock()
        self._returned: deque[list[int]] = deque()

    @property
    def blocks(self) -> int:
        return self.data.shape[2] // BLOCK

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        self._drain()
        return self.blocks - len(self._free)

    def new_cache(self) -> KVCache:
        return KVCache(self)

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s keys and values: (2, slots, kv_heads, head_dim)."""
        return self.data[i]

    def take(self, n: int) -> list[int]:
        with self._lock:
            self._take_back()
            if n > len(self._free):
                self._grow(n - len(self._free))
            taken = [self._free.pop() for _ in range(n)]
            self._take_back()  # (what came back meanwhile)
            return taken

    def give(self, blocks: list[int]) -> None:
        """A cache's blocks back: from its release, or its finalizer (any thread)."""
        self._returned.append(list(blocks))
        self._drain()

    def _drain(self) -> None:
        if self._lock.acquire(blocking=False):  # else its holder takes them back
            try:
                self._take_back()
            finally:
                self._lock.release()

    def _take_back(self) -> None:  # with the lock held
        while self._returned:
            self._free.extend(reversed(self._returned.popleft()))
        if not self.fixed and self.blocks > self._initial and self.blocks - len(self._free) == 1:
            shape = list(self.data.shape)
            shape[2] = self._initial * BLOCK
            self.data = self.data.new_zeros(shape)  # nothing live to copy: block 0 is scratch
            self._free = list(range(self._initial - 1, 0, -1))

    def _grow(self, need: int) -> None:
        if self.fixed:
            raise MemoryError(f"KV pool full ({self.blocks} blocks of {BLOCK} positions)")
        old = self.blocks
        new = max(2 * old, old + need)
        shape = list(self.data.shape)
        shape[2] = new * BLOCK
        grown = self.data.new_zeros(shape)
        grown[:, :, : old * BLOCK] = self.data
        self.data = grown
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def layout(self, caches: list[KVCache], seg_lens: list[int]) -> Layout:
        """Reserve room for ``seg_lens[i]`` new positions in ``caches[i]`` and describe the
        batch. Call :meth:`commit` after the forward to advance the caches' lengths."""
        for c, n in zip(caches, seg_lens, strict=True):
            c.reserve(n)
        return Layout.build(
            [c.length for c in caches], seg_lens, [c.blocks for c in caches], self.data.device
        )

    @staticmethod
    def commit(caches: list[KVCache], seg_lens: list[int]) -> None:
        for c, n in zip(caches, seg_lens, strict=True):
            c.length += n


class KVCache:
    """One request's part of the pool: its blocks and how many positions are valid.

    Readable: ``keys(layer)`` / ``values(layer)`` give (kv_heads, length, head_dim). The blocks
    go back to the pool on :meth:`release` (or when the cache is garbage-collected).
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self._finalizer = weakref.finalize(self, pool.give, self.blocks)

    def reserve(self, n_new: int) -> None:
        if not self._finalizer.alive:
            raise ValueError("KV cache used after release()")
        need = blocks_for(self.length + n_new) - len(self.blocks)
        if need > 0:
            self.blocks.extend(self.pool.take(need))

    def release(self) -> None:
        """Give the blocks back (idempotent); the cache is unusable afterwards."""
        self._finalizer()
        self.length = 0

    def _slots(self) -> torch.Tensor:
        if not self._finalizer.alive:
            raise ValueError("KV cache read after release()")
        idx = torch.arange(self.length)
        blocks = torch.tensor(self.blocks, dtype=torch.long)
        return (blocks[idx // BLOCK] * BLOCK + idx % BLOCK).to(self.pool.data.device)

    def keys(self, layer: int) -> torch.Tensor:
        return self.pool.layer(layer)[0, self._slots()].transpose(0, 1)

    def values(self, layer: int) -> torch.Tensor:
        return self.pool.layer(layer)[1, self._slots()].transpose(0, 1)

    def nbytes(self) -> int:
        d = self.pool.data
        return len(self.blocks) * BLOCK * d[0, 0, 0].numel() * d.shape[0] * 2 * d.element_size()


@dataclass
class Group:
    """Requests attended together, padded to ``q_len`` query rows and ``blocks * BLOCK`` keys.

    ``rows``: the packed-batch rows of the group's tokens; ``pad_rows``: where each of them sits
    in the padded (requests * q_len) query array; ``q_pos``: absolute position of every padded
    query row (B, q_len); ``mask``: (B, 1, q_len, T) True where a query may attend a key.
    """

    rows: torch.Tensor
    pad_rows: torch.Tensor
    block_table: torch.Tensor  # (B, blocks)
    q_pos: torch.Tensor
    mask: torch.Tensor
    q_len: int
    in_order: bool = False  # the packed rows already are the padded array (a static prefill)
    _bias: dict[tuple[torch.dtype, int], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def bias(self, dtype: torch.dtype, stack: int = 1) -> torch.Tensor:
        """:func:`additive_bias` of the mask, made once per forward and read by every layer:
        given the bool mask, SDPA makes such a bias in every layer (three more kernels per
        layer, which a replayed decode step launches one by one)."""
        if (b := self._bias.get((dtype, stack))) is None:
            b = self._bias[(dtype, stack)] = additive_bias(self.mask, dtype, stack)
        return b

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows (N, ...) -> (B, q_len, ...), zeros where a request has fewer rows."""
        b = self.block_table.shape[0]
        out = x.new_zeros((b * self.q_len, *x.shape[1:]))
        out[self.pad_rows] = x[self.rows]
        return out.view(b, self.q_len, *x.shape[1:])

    def unpad_into(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Write the real rows of padded ``y`` (B, q_len, ...) back into packed ``out``."""
        out[self.rows] = y.reshape(-1, *y.shape[2:])[self.pad_rows]


def additive_bias(mask: torch.Tensor, dtype: torch.dtype, stack: int = 1) -> torch.Tensor:
    """A bool attention mask (B, 1, L, T) as an additive bias in ``dtype``: 0 where a query may
    attend a key, -inf elsewhere; for L > 1 each request's L rows repeated ``stack`` times (the
    query heads of one KV head stacked as rows, as :func:`cosyvoice.llm.qwen2.attention` reads
    them; a single row broadcasts as it is): (B, 1, stack * L or 1, T)."""
    m = mask if mask.shape[2] == 1 else mask.repeat(1, 1, stack, 1)
    return torch.full(m.shape, float("-inf"), dtype=dtype, device=m.device).masked_fill_(m, 0.0)


@dataclass
class Layout:
    """One forward's ragged batch: ``slots`` (N,) where each new token's K/V is written,
    ``positions`` (N,) for RoPE, and the attention groups."""

    slots: torch.Tensor
    positions: torch.Tensor
    groups: list[Group]

    def attend(self, q: torch.Tensor, keys_of: KeysOf, attend: AttendFn) -> torch.Tensor:
        """Attention for every packed query row (N, heads, hd) -> (N, heads * hd): per group,
        ``keys_of(group)`` gives its (keys, values) and ``attend(q_padded, keys, values,
        group)`` the padded output. A pure decode step needs no padding at all."""
        n, g = q.shape[0], self.groups[0]
        if len(self.groups) == 1 and (g.q_len == 1 or g.in_order):  # rows are already in order
            q = q.view(n // g.q_len, g.q_len, *q.shape[1:])
            return attend(q, *keys_of(g), g).view(n, -1)
        out = q.new_empty(n, q.shape[1] * q.shape[2])
        for g in self.groups:
            g.unpad_into(out, attend(g.pad(q), *keys_of(g), g))
        return out

    @classmethod
    def build(
        cls,
        past: list[int],
        seg_lens: list[int],
        blocks: list[list[int]],
        device: torch.device,
    ) -> Layout:
        slots: list[int] = []
        positions: list[int] = []
        for p, n, blk in zip(past, seg_lens, blocks, strict=True):
            for pos in range(p, p + n):
                slots.append(slot(blk, pos))
                positions.append(pos)
        starts = [0]
        for n in seg_lens:
            starts.append(starts[-1] + n)
        members = ([i for i, n in enumerate(seg_lens) if n == 1],
                   [i for i, n in enumerate(seg_lens) if n > 1])  # fmt: skip
        groups = [
            _group(
                [past[i] for i in m],
                [seg_lens[i] for i in m],
                [blocks[i] for i in m],
                [starts[i] for i in m],
                device,
            )  # fmt: skip
            for m in members
            if m
        ]
        as_long = dict(dtype=torch.long, device=device)
        return cls(torch.tensor(slots, **as_long), torch.tensor(positions, **as_long), groups)


def _group(
    past: list[int], lens: list[int], blocks: list[list[int]], starts: list[int], device
) -> Group:
    q_len = max(lens)
    n_blocks = max(blocks_for(p + n) for p, n in zip(past, lens, strict=True))
    table = [table_row(blk, n_blocks) for blk in blocks]
    rows = [s + i for s, n in zip(starts, lens, strict=True) for i in range(n)]
    pad_rows = [j * q_len + i for j, n in enumerate(lens) for i in range(n)]
    as_long = dict(dtype=torch.long, device=device)
    past_t = torch.tensor(past, **as_long)
    q_pos = past_t[:, None] + torch.arange(q_len, device=device)
    k_pos = torch.arange(n_blocks * BLOCK, device=device)
    ctx = past_t + torch.tensor(lens, **as_long)
    # causal within the request and never past its own context (padded rows still see key 0,
    # so their softmax stays finite; they are dropped on unpad)
    mask = (k_pos <= q_pos[:, :, None]) & (k_pos < ctx[:, None, None])
    return Group(
        rows=torch.tensor(rows, **as_long),
        pad_rows=torch.tensor(pad_rows, **as_long),
        block_table=torch.tensor(table, **as_long),
        q_pos=q_pos,
        mask=mask[:, None],
        q_len=q_len,
    )


def gather(kv: torch.Tensor, group: Group) -> Tensors:
    """A group's keys and values from one layer of the pool: each (B, T, kv_heads, head_dim)."""
    _, slots, n_kv, hd = kv.shape
    b, nb = group.block_table.shape
    # index_select copies whole blocks; advanced indexing (kv[:, table]) went element by
    # element: 39 vs 9 us at batch 1, 1.2 vs 0.3 ms at 64 requests in bf16 (AMD EPYC, 2 cores)
    blocked = kv.view(2, slots // BLOCK, -1).index_select(1, group.block_table.flatten())
    blocked = blocked.view(2, b, nb * BLOCK, n_kv, hd)
    return blocked[0], blocked[1]


def write(kv: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """Store the new tokens' keys and values ``new`` (2, N, kv_heads, head_dim; any strides: a
    view of the projection's output) at their slots, in one kernel."""
    kv[:, slots] = new
