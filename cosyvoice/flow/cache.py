"""Streaming state of the flow: what a request's finished frames leave for its next chunk.

A streaming chunk of CosyVoice2/3 runs with chunk-masked attention (full left context), causal
convolutions, the fixed noise and real look-ahead tokens, so the frames of earlier chunks come out
the same however often they are recomputed. Instead of recomputing them, a request keeps a
:class:`FlowCache`: for every attention layer the keys and values of its finished positions, and
for every causal convolution the last ``k - 1`` input frames - once for the encoder, and once per
Euler step (x 2 rows: with and without the condition) for the estimator. A chunk then costs its own
frames plus attention over the past.

:class:`Past` is one forward call's view of the caches of its (ragged) batch: modules ask it for
their keys/values (``kv``) and convolution inputs (``conv``) and it reads, extends and writes the
per-request state. A call without caches uses fresh empty ones, so there is one code path; they are
kept only for requests that ``commit``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cosyvoice.devices import h2d


@dataclass
class FlowCache:
    """One request's flow state. ``tokens``: positions (prompt included) whose encoder output and
    estimator frames are final and cached; mel frames are ``tokens * token_mel_ratio``."""

    tokens: int = 0
    kv: dict[Hashable, list[torch.Tensor]] = field(default_factory=dict)  # [K, V, length]
    tails: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0  # of the K/V buffers (capacity included); the tails are a few frames

    def read(self, key: Hashable, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, length = self.kv[key]
        if length != n:  # a caller skipped or repeated a chunk: refuse rather than misalign
            raise RuntimeError(f"flow cache holds {length} positions, the call starts at {n}")
        return k[..., :n, :], v[..., :n, :]

    def write(self, key: Hashable, start: int, k: torch.Tensor, v: torch.Tensor, keep: bool):
        """Put k, v (rows, H, T, dh) at [start, start + T) and return views of [0, start + T);
        ``keep``: they become part of the cache (else the next write overwrites them - a final
        call reads the past without copying it). Buffers grow by half so appends are amortised
        O(T)."""
        end = start + k.shape[-2]
        if start:
            self.read(key, start)
        buf = self.kv.get(key)
        if buf is None or buf[0].shape[-2] < end:
            cap = max(end, 3 * end // 2) if keep and start else end
            grown = [k.new_empty(*k.shape[:-2], cap, k.shape[-1]) for _ in range(2)]
            self.nbytes += 2 * grown[0].numel() * grown[0].element_size()
            if buf is not None:
                self.nbytes -= 2 * buf[0].numel() * buf[0].element_size()
                grown[0][..., :start, :] = buf[0][..., :start, :]
                grown[1][..., :start, :] = buf[1][..., :start, :]
            buf = [*grown, start]
            self.kv[key] = buf
        buf[0][..., start:end, :] = k
        buf[1][..., start:end, :] = v
        if keep:
            buf[2] = end
        return buf[0][..., :end, :], buf[1][..., :end, :]


class Past:
    """A forward call's view of its batch's caches at one resolution (tokens or frames).

    Rows are ``rows`` groups of ``B`` requests (row ``j * B + b`` belongs to request ``b``; the
    estimator has 2 groups: conditional and unconditional). Request ``b``'s new positions are
    ``[start[b], start[b] + lens[b])``, right-padded to ``T = max(lens)``; keys are indexed by
    absolute position and right-padded to ``max(start + lens)``. ``chunk`` > 0 gives streaming
    requests chunk-masked attention (position i sees j < (i // chunk + 1) * chunk)."""

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
    ):
        self.caches, self.start, self.lens, self.rows, self.tag = caches, start, lens, rows, tag
        self.commit = commit or [False] * len(caches)
        self.ends = [s + n for s, n in zip(start, lens, strict=True)]
        s = h2d(start, device)
        q = torch.arange(max(lens), device=device)
        j = torch.arange(max(self.ends), device=device)
        pos = s[:, None] + q[None, :]  # (B, T) absolute positions of the queries
        m = j[None, None, :] < h2d(self.ends, device)[:, None, None]
        if chunk > 0:
            seen = j[None, None, :] < ((pos // chunk + 1) * chunk)[..., None]
            m = m & (seen | ~h2d(streaming, device)[:, None, None])
        padded = q[None, :] >= h2d(lens, device)[:, None]
        m = m | padded[..., None] & (j == 0)  # padding rows see one key: no empty softmax
        self.mask = m.repeat(rows, 1, 1)[:, None]  # (rows*B, 1, T, K) bool, True = attend
        self.positions = pos.repeat(rows, 1)  # (rows*B, T)
        self.valid = (~padded).repeat(rows, 1)  # (rows*B, T)
        self._rel: tuple[torch.Tensor, torch.Tensor] | None = None

    def at(self, tag: Hashable) -> Past:
        """The same view keyed apart (one per Euler step: each step has its own state)."""
        p = copy.copy(self)
        p.tag = tag
        return p

    def _reused(self) -> bool:
        """Whether any request reads or keeps state; if not, keys are the new positions."""
        return any(self.start) or any(self.commit)

    def kv(self, mod: object, k: torch.Tensor, v: torch.Tensor):
        """Keys/values of every position up to each request's end, (rows*B, H, K, dh), for new
        k, v (rows*B, H, T, dh); stores the new ones of committing requests."""
        if not self._reused():  # fresh requests only: the keys are the new positions
            return k, v
        key, b_n = (self.tag, mod), len(self.caches)
        ks, vs = [], []
        for b, c in enumerate(self.caches):
            kb, vb = k[b::b_n, :, : self.lens[b]], v[b::b_n, :, : self.lens[b]]
            if self.commit[b] or self.start[b]:
                kb, vb = c.write(key, self.start[b], kb, vb, keep=self.commit[b])
            ks.append(kb)
            vs.append(vb)
        if b_n == 1:
            return ks[0], vs[0]
        return self._stack(ks), self._stack(vs)

    def _stack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        n = max(self.ends)
        x = torch.stack([F.pad(t, (0, 0, 0, n - t.shape[-2])) for t in xs], 1)
        return x.flatten(0, 1)  # (rows, B, ...) -> rows*B in j*B+b order

    def conv(self, mod: object, x: torch.Tensor, n: int) -> torch.Tensor:
        """x (rows*B, C, T) with the ``n`` input frames before each request's new ones prepended
        (zeros at the start of an utterance, like the convolution's own left padding)."""
        if n == 0:
            return x
        if not self._reused():
            return F.pad(x, (n, 0))
        key, b_n = (self.tag, mod), len(self.caches)
        zero = x.new_zeros(self.rows, x.shape[1], n)
        tails = [c.tails[key] if s else zero for c, s in zip(self.caches, self.start, strict=True)]
        xx = torch.cat([torch.stack(tails, 1).flatten(0, 1), x], -1)
        for b, c in enumerate(self.caches):
            if self.commit[b]:
                c.tails[key] = xx[b::b_n, :, self.lens[b] : self.lens[b] + n].clone()
        return xx

    def rel_pos(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The conformer's relative-position inputs: a sinusoidal table of every offset i - j
        from ``max(end) - 1`` down to ``-(T - 1)`` (the rows of the whole-sequence table that
        the call needs), and the (rows*B, T, K) index of each query/key pair in it."""
        if self._rel is None or self._rel[0].shape[-1] != d:
            hi, lo = max(self.ends) - 1, -(max(self.lens) - 1)
            pos = torch.arange(hi, lo - 1, -1, dtype=torch.float32)[:, None]
            div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
            table = torch.zeros(hi - lo + 1, d)
            table[:, 0::2] = torch.sin(pos * div)
            table[:, 1::2] = torch.cos(pos * div)
            j = torch.arange(max(self.ends), device=self.positions.device)
            idx = hi - (self.positions[..., None] - j)
            self._rel = (table.to(self.positions.device), idx.clamp(0, hi - lo))
        return self._rel
