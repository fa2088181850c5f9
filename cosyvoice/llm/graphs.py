"""The decode step at static shapes, captured as CUDA graphs (v2/v3 Qwen2 LM).

A decode step over B requests is ~24 layers x 30 small kernels: on a GPU the launches,
not the math, set its time. So the step is captured once per (batch bucket, context bucket)
and replayed: inputs are copied into static buffers, padded rows write their keys to the
pool's scratch block 0 and attend only to it, and the step's draw (:mod:`.sampling`) runs in the
replay, so the real rows' tokens are what the host waits for.
First inputs (up to 16 requests' at once) run the same way at a prefill bucket of requests and
positions; a step where some requests decode and others start replays both kinds of graph.
On the CPU the same static step runs eagerly (``capture=False``), which is how the padding and
bucketing are tested without a GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from cosyvoice.devices import GraphPool, bucket, h2d_into

from .kv import BLOCK, Group, KVCache, KVPool, Layout, blocks_for, slot, table_row
from .lm import QwenSpeechLM
from .sampling import Sampler

log = logging.getLogger("cosyvoice")

Outputs = tuple[torch.Tensor, torch.Tensor]  # a step's logits (B, V) and drawn tokens (B,)

BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CONTEXT_BLOCKS = (8, 16, 32, 64, 128)  # 256 .. 4096 positions
# Requests' first inputs (what their listeners' first audio waits on): each one's positions
# padded to a bucket, the requests to a batch bucket. Eagerly a prefill's ~1 000 launches took
# 30 ms on an H200's host, and a step where a request joins others decoding ran all of them
# eagerly; the engine feeds at most its prefill_chunk (128) positions of a request a step.
PREFILLS = (32, 64, 128)
PREFILL_BATCHES = (1, 2, 4, 8, 16)


class DecodeGraphs:
    def __init__(
        self,
        net: QwenSpeechLM,
        pool: KVPool,
        max_batch: int,
        sampler: Sampler,
        capture: bool | None = None,
    ) -> None:
        self.net, self.pool, self.sampler = net, pool, sampler
        self.batches = [b for b in BATCHES if b < max_batch] + [max_batch]
        self.contexts = list(CONTEXT_BLOCKS)
        self.capture = pool.data.device.type == "cuda" if capture is None else capture
        dev, d = pool.data.device, net.cfg.llm_input_size
        mb, mc = self.batches[-1], self.contexts[-1]
        self.x = torch.zeros(mb, d, dtype=pool.data.dtype, device=dev)
        # A step's integer inputs, all in one buffer so that one copy from the host fills them
        # (three copies were six launches of every step): see _ints. The draw's rows too: a
        # step replays its forward and its draw, and only its tokens come back.
        self.width = sampler.width
        self.ints = torch.zeros(mb * (2 + mc + self.width), dtype=torch.long, device=dev)
        self.max_pos = mc * BLOCK - 1
        # The RoPE tables the graphs read, held here: an eager step past the largest context
        # bucket grows the model's as new tensors, and the old ones' memory, once freed, would
        # be handed out again while every replay still reads it.
        self.rope = net.qwen.rope_tables(self.max_pos)
        self.prefill_batches = sorted({min(r, max_batch) for r in PREFILL_BATCHES})
        pr, pl = self.prefill_batches[-1], PREFILLS[-1]
        self.px = torch.zeros(pr * pl, d, dtype=pool.data.dtype, device=dev)
        self.pints = torch.zeros(
            pr * (pl + 1 + pl // BLOCK + self.width), dtype=torch.long, device=dev
        )
        self.prefills = 0  # prefills that ran as a bucket (the rest ran eagerly)
        self.prefill_on = True
        # (batch, context blocks) of a decode step; (-requests, positions) of a prefill
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = GraphPool(dev)

    @property
    def max_batch(self) -> int:
        return self.batches[-1]

    def holds(self, cache: KVCache) -> bool:
        """Whether a decode step of this cache's request has a context bucket (the largest:
        a request's share of the fixed pool)."""
        return cache.length + 1 <= self.contexts[-1] * BLOCK

    def fits(self, caches: list[KVCache]) -> bool:
        """Whether this step (every request decoding one token) has a bucket."""
        return len(caches) <= self.max_batch and all(self.holds(c) for c in caches)

    def fits_prefill(self, caches: list[KVCache], lens: list[int]) -> bool:
        """Whether these are first inputs (each at most the largest bucket) of at most the
        largest prefill batch of requests."""
        return (
            self.prefill_on
            and 0 < len(caches) <= self.prefill_batches[-1]
            and all(c.length == 0 and n <= PREFILLS[-1] for c, n in zip(caches, lens, strict=True))
        )

    def capture_all(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        if not self.capture:
            return
        for b in reversed(self.batches):
            for nb in reversed(self.contexts):
                self._capture(b, nb)
        try:
            for r in reversed(self.prefill_batches):
                for n in reversed(PREFILLS):
                    self._capture(-r, n)
        except Exception:  # decode steps keep their graphs; first inputs run eagerly
            log.exception("capturing the LLM's prefill graphs failed; first inputs run eagerly")
            self.prefill_on = False

    def run(
        self, xs: list[torch.Tensor], caches: list[KVCache], rows: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (len(caches), V) and drawn tokens (len(caches),) of one decode step over
        each request's input ``xs[i]`` (1, d) and draw row ``rows[i]`` (:meth:`Draw.row`);
        advances the caches by one position."""
        n = len(caches)
        for c in caches:
            c.reserve(1)
        b = bucket(self.batches, n)
        need = max(blocks_for(c.length + 1) for c in caches)
        nb = bucket(self.contexts, need)
        if self.capture and (b, nb) not in self._graphs:
            self._capture(b, nb)  # before _fill: it runs on padding, which it writes
        self._fill(xs, caches, rows, b, nb)
        logits, tokens = self._static((b, nb), lambda: self._step(b, nb))
        KVPool.commit(caches, [1] * n)
        return logits[:n], tokens[:n]

    def run_prefill(
        self, xs: list[torch.Tensor], caches: list[KVCache], rows: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (R, V) at the last of each fresh request's ``xs[i]`` (N_i, d) positions,
        which go into its cache, and the tokens drawn from them with ``rows``."""
        lens = [x.shape[0] for x in xs]
        for c, n in zip(caches, lens, strict=True):
            c.reserve(n)
        r, n = bucket(self.prefill_batches, len(xs)), bucket(PREFILLS, max(lens))
        if self.capture and (-r, n) not in self._graphs:
            self._capture(-r, n)
        self.px[: r * n].zero_()  # padded positions write to the scratch slot; none reads them
        slots = [[0] * n for _ in range(r)]
        for i, (c, m) in enumerate(zip(caches, lens, strict=True)):
            self.px[i * n : i * n + m].copy_(xs[i])
            slots[i][:m] = [slot(c.blocks, p) for p in range(m)]
        pad = r - len(xs)
        table = [table_row(c.blocks, n // BLOCK) for c in caches] + [[0] * (n // BLOCK)] * pad
        draws = rows + [self.sampler.idle_row()] * pad
        h2d_into(self.pints, _flat(slots) + lens + [1] * pad + _flat(table) + _flat(draws))
        logits, tokens = self._static((-r, n), lambda: self._prefill_step(r, n))
        KVPool.commit(caches, lens)
        self.prefills += len(xs)
        return logits[: len(xs)], tokens[: len(xs)]

    def _static(self, key: tuple[int, int], forward: Callable[[], Outputs]) -> Outputs:
        """The outputs of ``key``'s graph, replayed (on the CPU: ``forward`` run eagerly)."""
        if not self.capture:
            return forward()
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _forward_prefill(self, r: int, n: int) -> torch.Tensor:
        """The static first inputs of ``r`` requests, ``n`` positions each (padding included):
        causal attention over each request's own keys, the logits of its last real position."""
        dev = self.px.device
        pos = torch.arange(n, device=dev)
        rows = torch.arange(r * n, device=dev)
        slots, plen, table, _ = self._prefill_ints(r, n)
        mask = (pos <= pos[:, None]) & (pos < plen[:, None, None])  # (r, n, n): causal, real keys
        group = Group(rows=rows, pad_rows=rows, block_table=table,
                      q_pos=pos.expand(r, n), mask=mask[:, None], q_len=n, in_order=True)  # fmt: skip
        layout = Layout(slots=slots, positions=pos.repeat(r), groups=[group])
        h = self.net.qwen.forward_layout(self.px[: r * n], self.pool, layout, self.max_pos,
                                         self.rope)  # fmt: skip
        return self.net.llm_decoder(h.index_select(0, rows[::n] + plen - 1))

    def _ints(self, b: int, nb: int) -> tuple[torch.Tensor, ...]:
        """Bucket (b, nb)'s views of ``ints``: where each row's new key goes (b,), its context
        length (b,), its block table (b, nb) and its draw row (b, width), one after the other."""
        return _split(self.ints, (b,), (b,), (b, nb), (b, self.width))

    def _prefill_ints(self, r: int, n: int) -> tuple[torch.Tensor, ...]:
        """A prefill bucket's views of ``pints``: each position's slot (r * n,), each request's
        real positions (r,), its block table (r, n / BLOCK) and its draw row (r, width)."""
        return _split(self.pints, (r * n,), (r,), (r, n // BLOCK), (r, self.width))

    def _step(self, b: int, nb: int) -> Outputs:
        logits = self._forward(b, nb)
        return logits, self.sampler(logits, self._ints(b, nb)[3])

    def _prefill_step(self, r: int, n: int) -> Outputs:
        logits = self._forward_prefill(r, n)
        return logits, self.sampler(logits, self._prefill_ints(r, n)[3])

    def _fill(
        self, xs: list[torch.Tensor], caches: list[KVCache], rows: list[list[int]], b: int, nb: int
    ) -> None:
        n, pad = len(caches), b - len(caches)  # padded rows: the scratch slot, key 0 alone
        slots = [slot(c.blocks, c.length) for c in caches] + [0] * pad
        ctx = [c.length + 1 for c in caches] + [1] * pad
        table = [table_row(c.blocks, nb) for c in caches] + [[0] * nb] * pad
        draws = rows + [self.sampler.idle_row()] * pad
        torch.cat(xs, out=self.x[:n])
        self.x[n:b].zero_()
        h2d_into(self.ints, slots + ctx + _flat(table) + _flat(draws))

    def _forward(self, b: int, nb: int) -> torch.Tensor:
        """The static step: every op reads the buffers, so it can be captured."""
        slots, ctx, table, _ = self._ints(b, nb)
        k_pos = torch.arange(nb * BLOCK, device=ctx.device)
        group = Group(
            rows=torch.arange(b, device=ctx.device),
            pad_rows=torch.arange(b, device=ctx.device),
            block_table=table,
            q_pos=(ctx - 1)[:, None],
            mask=(k_pos < ctx[:, None, None])[:, None],
            q_len=1,
        )
        layout = Layout(slots=slots, positions=ctx - 1, groups=[group])
        h = self.net.qwen.forward_layout(self.x[:b], self.pool, layout, self.max_pos, self.rope)
        return self.net.llm_decoder(h)

    def _capture(self, b: int, nb: int) -> None:
        """The decode step of bucket (b, nb), or with b = -r the prefill of r requests' nb
        positions, on padding only (every write goes to the scratch block)."""
        slots, ctx, table, draws = self._ints(b, nb) if b > 0 else self._prefill_ints(-b, nb)
        slots.zero_()
        ctx.fill_(1)  # (a prefill's: each request's real positions)
        table.zero_()
        draws.zero_()
        step = (lambda: self._step(b, nb)) if b > 0 else (lambda: self._prefill_step(-b, nb))
        self._graphs[(b, nb)] = self._graph_pool.capture(step)


def _flat(rows: list[list[int]]) -> list[int]:
    return [x for row in rows for x in row]


def _split(buf: torch.Tensor, *shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Consecutive views of the start of 1-D ``buf``, one per shape."""
    views, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(buf[at : at + n].view(shape))
        at += n
    return tuple(views)
