"""The decode step at static shapes, captured as CUDA graphs (v2/v3 Qwen2 LM).

A decode step over B requests is ~24 layers x 30 small kernels: on a GPU the launches,
not the math, set its time. So the step is captured once per (batch bucket, context bucket)
and replayed: inputs are copied into static buffers, padded rows write their keys to the
pool's scratch block 0 and attend only to it, and the logits of the real rows are read back.
A request's first input, alone in its step, runs the same way at a prefill bucket of positions.
On the CPU the same static step runs eagerly (``capture=False``), which is how the padding and
bucketing are tested without a GPU.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

from cosyvoice.devices import capture_graph, h2d

from .kv import BLOCK, Group, KVCache, KVPool, Layout, blocks_for, slot, table_row
from .lm import QwenSpeechLM

log = logging.getLogger("cosyvoice")

BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CONTEXT_BLOCKS = (8, 16, 32, 64, 128)  # 256 .. 4096 positions
# A request's first input alone in a step (what one listener's first audio waits on): its
# positions, padded to a bucket. Eagerly its ~1 000 launches took 30 ms on an H200's host; the
# engine feeds at most its prefill_chunk (128) positions a step.
PREFILLS = (32, 64, 128)


class DecodeGraphs:
    def __init__(
        self, net: QwenSpeechLM, pool: KVPool, max_batch: int, capture: bool | None = None
    ) -> None:
        self.net, self.pool = net, pool
        self.batches = [b for b in BATCHES if b < max_batch] + [max_batch]
        self.contexts = list(CONTEXT_BLOCKS)
        self.capture = pool.data.device.type == "cuda" if capture is None else capture
        dev, d = pool.data.device, net.cfg.llm_input_size
        mb, mc = self.batches[-1], self.contexts[-1]
        self.x = torch.zeros(mb, d, dtype=pool.data.dtype, device=dev)
        self.slots = torch.zeros(mb, dtype=torch.long, device=dev)  # 0: the scratch slot
        self.ctx = torch.ones(mb, dtype=torch.long, device=dev)
        self.table = torch.zeros(mb, mc, dtype=torch.long, device=dev)
        self.max_pos = mc * BLOCK - 1
        # The RoPE tables the graphs read, held here: an eager step past the largest context
        # bucket grows the model's as new tensors, and the old ones' memory, once freed, would
        # be handed out again while every replay still reads it.
        self.rope = net.qwen.rope_tables(self.max_pos)
        pl = PREFILLS[-1]
        self.px = torch.zeros(pl, d, dtype=pool.data.dtype, device=dev)
        self.pslots = torch.zeros(pl, dtype=torch.long, device=dev)
        self.plen = torch.ones(1, dtype=torch.long, device=dev)  # real positions
        self.ptable = torch.zeros(1, pl // BLOCK, dtype=torch.long, device=dev)
        self.prefills = 0  # prefills that ran as a bucket (the rest ran eagerly)
        self.prefill_on = True
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None
        self._stream: torch.cuda.Stream | None = None  # warm-up and capture (devices.capture_graph)

    @property
    def max_batch(self) -> int:
        return self.batches[-1]

    def fits(self, caches: list[KVCache]) -> bool:
        """Whether this step (every request decoding one token) has a bucket."""
        return len(caches) <= self.max_batch and all(
            c.length + 1 <= self.contexts[-1] * BLOCK for c in caches
        )

    def fits_prefill(self, caches: list[KVCache], lens: list[int]) -> bool:
        """Whether this step is one request's first input (at most the largest bucket)."""
        return (
            self.prefill_on
            and len(caches) == 1
            and caches[0].length == 0
            and lens[0] <= PREFILLS[-1]
        )

    def capture_all(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        if not self.capture:
            return
        self._mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.batches):
            for nb in reversed(self.contexts):
                self._capture(b, nb)
        try:
            for n in reversed(PREFILLS):
                self._capture(0, n)
        except Exception:  # decode steps keep their graphs; first inputs run eagerly
            log.exception("capturing the LLM's prefill graphs failed; first inputs run eagerly")
            self.prefill_on = False

    def run(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Logits (len(caches), V) of one decode step; advances the caches by one position."""
        n = len(caches)
        for c in caches:
            c.reserve(1)
        b = self.batches[bisect.bisect_left(self.batches, n)]
        need = max(blocks_for(c.length + 1) for c in caches)
        nb = self.contexts[bisect.bisect_left(self.contexts, need)]
        if self.capture and (b, nb) not in self._graphs:
            self._capture(b, nb)  # before _fill: it runs on padding, which it writes
        self._fill(x, caches, b, nb)
        logits = self._static((b, nb), lambda: self._forward(b, nb))
        KVPool.commit(caches, [1] * n)
        return logits[:n]

    def run_prefill(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, V) at the last of a fresh request's ``x`` (N, d) positions, which go
        into its cache."""
        n = x.shape[0]
        cache.reserve(n)
        bucket = PREFILLS[bisect.bisect_left(PREFILLS, n)]
        if self.capture and (0, bucket) not in self._graphs:
            self._capture(0, bucket)
        pad = bucket - n  # padded positions write to the scratch slot; none reads them
        self.px[:n].copy_(x)
        self.px[n:bucket].zero_()
        dev = self.px.device
        self.pslots[:bucket].copy_(h2d([slot(cache.blocks, p) for p in range(n)] + [0] * pad, dev))
        self.plen.fill_(n)
        self.ptable[:, : bucket // BLOCK].copy_(
            h2d([table_row(cache.blocks, bucket // BLOCK)], dev)
        )
        logits = self._static((0, bucket), lambda: self._forward_prefill(bucket))
        KVPool.commit([cache], [n])
        self.prefills += 1
        return logits

    def _static(self, key: tuple[int, int], forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The output of ``key``'s graph, replayed (on the CPU: ``forward`` run eagerly)."""
        if not self.capture:
            return forward()
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _forward_prefill(self, n: int) -> torch.Tensor:
        """The static first input of ``n`` positions (padding included): causal attention over
        the request's own keys, the logits of its last real position."""
        pos = torch.arange(n, device=self.px.device)
        mask = (pos <= pos[:, None]) & (pos < self.plen)  # (n, n): causal, real keys only
        group = Group(rows=pos, pad_rows=pos, block_table=self.ptable[:, : n // BLOCK],
                      q_pos=pos[None], mask=mask[None, None], q_len=n)  # fmt: skip
        layout = Layout(slots=self.pslots[:n], positions=pos, groups=[group])
        h = self.net.qwen.forward_layout(self.px[:n], self.pool, layout, self.max_pos, self.rope)
        return self.net.llm_decoder(h.index_select(0, self.plen - 1))

    def _fill(self, x: torch.Tensor, caches: list[KVCache], b: int, nb: int) -> None:
        n = len(caches)
        slots, ctx, table = [], [], []
        for c in caches:
            pos = c.length
            slots.append(slot(c.blocks, pos))
            ctx.append(pos + 1)
            table.append(table_row(c.blocks, nb))
        pad = b - n  # padded rows: write to the scratch slot, attend to it alone
        dev = self.x.device  # through pinned memory: a pageable copy would wait for the stream
        self.x[:n].copy_(x)
        self.x[n:b].zero_()
        self.slots[:b].copy_(h2d(slots + [0] * pad, dev))
        self.ctx[:b].copy_(h2d(ctx + [1] * pad, dev))
        self.table[:b, :nb].copy_(h2d(table + [[0] * nb] * pad, dev))

    def _forward(self, b: int, nb: int) -> torch.Tensor:
        """The static step: every op reads the buffers, so it can be captured."""
        ctx = self.ctx[:b]
        k_pos = torch.arange(nb * BLOCK, device=ctx.device)
        group = Group(
            rows=torch.arange(b, device=ctx.device),
            pad_rows=torch.arange(b, device=ctx.device),
            block_table=self.table[:b, :nb],
            q_pos=(ctx - 1)[:, None],
            mask=(k_pos < ctx[:, None, None])[:, None],
            q_len=1,
        )
        layout = Layout(slots=self.slots[:b], positions=ctx - 1, groups=[group])
        h = self.net.qwen.forward_layout(self.x[:b], self.pool, layout, self.max_pos, self.rope)
        return self.net.llm_decoder(h)

    def _capture(self, b: int, nb: int) -> None:
        """The decode step of bucket (b, nb), or with b = 0 the prefill of nb positions, on
        padding only (every write goes to the scratch block)."""
        self.slots[:b].zero_()
        self.ctx[:b].fill_(1)
        self.table[:b, :nb].zero_()
        self.pslots.zero_()
        self.plen.fill_(1)
        self.ptable.zero_()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.pool.data.device)
        step = (lambda: self._forward(b, nb)) if b else (lambda: self._forward_prefill(nb))
        self._graphs[(b, nb)] = capture_graph(step, self._mempool, self._stream)
