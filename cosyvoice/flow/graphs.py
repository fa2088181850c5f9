"""The flow's encoder (v2) and Euler loop at static shapes, captured as CUDA graphs (v2/v3).

A streaming flow call runs the estimator 10 times (both guidance rows at once); each run is a
few thousand small kernels, so on a GPU a chunk's ~28 000 launches, not its math, set its time,
and the encoder's ~500, launched eagerly, took 18-40 ms of a first chunk on an H200.
Over pooled streams a call is a fixed op sequence over index tensors (:mod:`.cache`), so the
whole call is captured once per (batch, new frames, context) bucket and replayed: the call's
inputs and indices (at frame and at token rate) are copied into static buffers, padded rows and
positions write to the pool's scratch block and slot and attend to one scratch key, and the
real rows are read back.

A graph holds the addresses of the pool's tensors, so the pool stops shrinking while graphs
are on (``FlowPool.keep``) and a graph is captured anew once the pool has grown. On the CPU
the same static loop runs eagerly (``capture=False``): that is how the padding is tested
without a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from cosyvoice.devices import Calls, GraphPool, bucket, h2d

from .cache import SCRATCH_SLOT, ZERO_SLOT, EncoderInputs, FlowPool, Past
from .decoder import cfm_euler, euler_times

BATCHES = (1, 2, 4, 8, 16, 32, 64)
FRAMES = (32, 64, 96, 128, 192, 256, 384, 512)  # new frames per call: a hop of 25 tokens
# is 50; a zero-shot speaker's first chunk carries the end of its prompt too (up to ~150; the
# whole prompt, 10 s: ~550, when it is not in the flow's prompt store)
CONTEXTS = (128, 256, 512, 1024, 2048, 4096)  # positions up to the call's end (4096: ~82 s)
INPUTS = ("z", "mask", "mu", "cond")  # (B, C, T) each; spks (B, C) apart
CAPTURE_AT = 3  # after warm-up, a new bucket's call that captures it (the earlier ones run eagerly)


class FlowGraphs:
    """The encoder (v2, :meth:`with_encoder`) and the estimator's Euler loop of one flow model
    over up to ``max_batch`` pooled streams."""

    def __init__(self, estimator: torch.nn.Module, pool: FlowPool, n_steps: int,
                 cfg_rate: float, max_batch: int, device: torch.device, calls: Calls,
                 capture: bool | None = None, frames: tuple[int, ...] = FRAMES,
                 contexts: tuple[int, ...] = CONTEXTS) -> None:  # fmt: skip
        self.estimator, self.pool, self.n_steps, self.cfg_rate = estimator, pool, n_steps, cfg_rate
        self.batches = [b for b in BATCHES if b < max_batch] + [max_batch]
        self.frames, self.contexts = frames, contexts
        self.calls = calls  # the flow's
        self.captures = 0  # graphs captured (again after the pool grew)
        # Once warm-up has captured a stream's first shapes, a bucket met first mid-burst (a
        # final chunk's, a long stream's) runs eagerly at its static shape and is captured when
        # the model is idle (capture_pending), or at its CAPTURE_AT-th call if it keeps coming
        # (a server under steady load is never idle). Captured there and then, its warm-up run
        # and capture stalled every stream of the burst for about two calls' time (1-2 s at 48
        # streams on an H200), and each new batch size met a final chunk's shape anew.
        self.defer = False
        self.pending: Counter[tuple[int, int, int]] = Counter()  # calls each has had
        self._captured: set[tuple[int, int, int]] = set()  # ever: a grown pool drops them all
        self.device = device
        self.capture = device.type == "cuda" if capture is None else capture
        self.pool.keep = self.pool.keep or self.capture
        self._bufs: dict[str, torch.Tensor] = {}
        self.encode: Callable[[EncoderInputs], torch.Tensor] | None = None
        self.ratio = self.lookahead = 0
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._layout: tuple | None = None
        self._graph_pool = GraphPool(device)

    def with_encoder(self, encode: Callable[[EncoderInputs], torch.Tensor], ratio: int,
                     lookahead: int) -> None:  # fmt: skip
        """Run the encoder in the graphs too: ``encode`` gives mu (B, ratio * T, 80) of a
        call's :class:`EncoderInputs` (T + ``lookahead`` tokens each)."""
        self.encode, self.ratio, self.lookahead = encode, ratio, lookahead
        self.drop()

    def fits(self, batch: int, frames: int, context: int) -> bool:
        return (
            batch <= self.batches[-1] and frames <= self.frames[-1] and context <= self.contexts[-1]
        )

    def run(self, z, mask, mu, spks, cond, past: Past, enc: EncoderInputs | None = None):
        """What :func:`cfm_euler` gives for a pooled call (inputs (B, C, T), ``past`` its view
        of the estimator's state), computed at the call's bucket; with the encoder in the
        graphs, mu is None: it comes from ``enc``."""
        n, t, k = z.shape[0], z.shape[-1], past.mask.shape[-1]
        key = (bucket(self.batches, n), bucket(self.frames, t), bucket(self.contexts, k))
        ins = dict(z=z, mask=mask, mu=mu, cond=cond, spks=spks)
        ins = {name: x for name, x in ins.items() if x is not None}  # mu: None with the encoder
        self._prepare(ins, enc)
        later = False
        if self.capture and key not in self._graphs:
            new = key not in self._captured  # (one captured before is wanted now: again)
            later = self.defer and new and self.pending[key] + 1 < CAPTURE_AT
            if later:
                self.pending[key] += 1
            else:
                self.pending.pop(key, None)
                self._capture(key)
        self._fill(ins, past, key, enc)
        replay = self.capture and not later
        self.calls.at_static_shapes(replay)
        if not replay:
            return self._forward(*key)[:n, :, :t]
        graph, out = self._graphs[key]
        graph.replay()
        return out[:n, :, :t].clone()  # the next replay overwrites ``out``

    def capture_pending(self) -> int:
        """Capture the most called of the buckets met since warm-up (one: a capture takes
        about two calls' time, and a request may come meanwhile); how many are left."""
        self._follow_pool()  # graphs over the pool as it was go first
        if self.pending:
            key, _ = self.pending.most_common(1)[0]
            del self.pending[key]
            if key not in self._graphs:
                self._capture(key)
        return len(self.pending)

    def _prepare(self, ins: dict[str, torch.Tensor], enc: EncoderInputs | None) -> None:
        """Static buffers in the inputs' dtypes; graphs over stale buffers or pool tensors go."""
        b, c, t, k = self.batches[-1], ins["z"].shape[1], self.frames[-1], self.contexts[-1]
        for name, x in ins.items():
            shape = (b, c) if name == "spks" else (b, x.shape[1], t)
            self._buf(name, shape, x.dtype)
        self._buf("att", (2, b, 1, t, k), torch.bool)  # the mask of both guidance rows
        self._view_bufs("", b, t, k)
        for name in ("slots_in", "slots_out"):
            self._buf(name, (b,), torch.long)
        if self.encode is not None:  # the encoder's: its views at frame rate and at token rate
            tt, kt = t // self.ratio, k // self.ratio
            self._buf("frm_att", (b, 1, t, k), torch.bool)
            self._buf("tok_att", (b, 1, tt, kt), torch.bool)
            self._view_bufs("tok_", b, tt, kt)
            self._buf("toks", (b, tt + self.lookahead), torch.long)
            self._buf("toks_valid", (b, tt + self.lookahead, 1), enc.valid.dtype)
            self._buf("has_ctx", (b,), torch.bool)
        if "times" not in self._bufs:  # as cfm_euler makes it: float32 under autocast too
            self._bufs["times"] = h2d(euler_times(self.n_steps), self.device)
            self.drop()
        self._follow_pool()

    def _follow_pool(self) -> None:
        """Graphs hold the pool's tensors: once it has grown, they go."""
        if self.pool.layout != self._layout:
            self._layout = self.pool.layout
            self.drop()

    def _view_bufs(self, pre: str, b: int, t: int, k: int) -> None:
        for name, shape in dict(write=(b, t), read=(b, k), positions=(b, t), lens=(b,)).items():
            self._buf(pre + name, shape, torch.long)
        self._buf(pre + "valid", (b, t), torch.bool)

    def _buf(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        x = self._bufs.get(name)
        if x is None or x.dtype != dtype or x.shape != shape:
            self._bufs[name] = torch.zeros(shape, dtype=dtype, device=self.device)
            self.drop()

    def drop(self) -> None:
        """Forget every graph, and their memory pool with them: a pool handle whose graphs are
        all gone cannot take a new capture."""
        self._graphs.clear()
        self._graph_pool.drop()

    def _pad(self, b: int, t: int, k: int) -> None:
        """Bucket (b, t, k) all padding: every write goes to scratch, every query sees key 0."""
        f = self._bufs
        for name in INPUTS:
            if name in f:
                f[name][:b, ..., :t].zero_()
        f["spks"][:b].zero_()
        f["slots_in"][:b].fill_(ZERO_SLOT)
        f["slots_out"][:b].fill_(SCRATCH_SLOT)
        done = set()  # the frame-rate views share the estimator's indices
        for pre, att, tb, kb in self._views(b, t, k):
            if pre not in done:
                done.add(pre)
                for name in ("write", "positions", "valid"):
                    f[pre + name][:b, :tb].zero_()
                f[pre + "read"][:b, :kb].zero_()
                f[pre + "lens"][:b].zero_()
            att.zero_()
            att[..., 0] = True
        if self.encode is not None:
            for name in ("toks", "toks_valid", "has_ctx"):
                f[name][:b].zero_()

    def _views(self, b: int, t: int, k: int) -> list[tuple[str, torch.Tensor, int, int]]:
        """(index prefix, mask, positions, keys) of the bucket's views: the estimator's; with
        the encoder, its frame-rate view (the estimator's indices, its own mask) and its
        token-rate one."""
        f = self._bufs
        views = [("", f["att"][:, :b, :, :t, :k], t, k)]
        if self.encode is not None:
            tt, kt = t // self.ratio, k // self.ratio
            views += [("", f["frm_att"][:b, :, :t, :k], t, k),
                      ("tok_", f["tok_att"][:b, :, :tt, :kt], tt, kt)]  # fmt: skip
        return views

    def _fill(self, ins: dict[str, torch.Tensor], past: Past, key: tuple[int, int, int],
              enc: EncoderInputs | None) -> None:  # fmt: skip
        n, t, k = ins["z"].shape[0], ins["z"].shape[-1], past.mask.shape[-1]
        self._pad(*key)
        f = self._bufs
        for name in INPUTS:
            if name in ins:
                f[name][:n, :, :t] = ins[name]
        f["spks"][:n] = ins["spks"]
        f["slots_in"][:n] = past.slots_in
        f["slots_out"][:n] = past.slots_out
        f["att"][:, :n, :, :t, :k] = past.mask.view(2, n, 1, t, k)
        self._fill_view("", past, n)
        if self.encode is not None:
            f["frm_att"][:n, :, :t, :k] = enc.frm.mask
            m = enc.tok.mask
            f["tok_att"][:n, :, : m.shape[2], : m.shape[3]] = m
            self._fill_view("tok_", enc.tok, n)
            tt = enc.toks.shape[1]
            f["toks"][:n, :tt] = enc.toks
            f["toks_valid"][:n, :tt] = enc.valid
            f["has_ctx"][:n] = enc.has_ctx

    def _fill_view(self, pre: str, past: Past, n: int) -> None:
        """A dynamic view's indices (write, read, positions, valid, lens) into the buffers
        named ``pre`` + each."""
        f, t, k = self._bufs, past.positions.shape[-1], past.mask.shape[-1]
        f[pre + "write"][:n, :t] = past.write.view(n, t)
        read = past.read
        if isinstance(read, slice):  # one stream whose blocks are in order
            read = torch.arange(read.start, read.stop, device=self.device)[None]
        f[pre + "read"][:n, :k] = read
        f[pre + "positions"][:n, :t] = past.positions[:n]
        f[pre + "valid"][:n, :t] = past.valid[:n]
        f[pre + "lens"][:n] = past.lens_dev

    def _view(self, pre: str, att: torch.Tensor, b: int, t: int, k: int, rows: int,
              **kw) -> Past:  # fmt: skip
        """The static view over the buffers named ``pre`` + each index (bucket b, t, k)."""
        f = self._bufs

        def per_row(x: torch.Tensor) -> torch.Tensor:
            return x if rows == 1 else x.repeat(rows, 1)

        return Past.over(
            self.pool, rows=rows, mask=att, write=f[pre + "write"][:b, :t].flatten(),
            # read contiguous once per view, not flattened into a copy by each of 560 layers
            read=f[pre + "read"][:b, :k].contiguous(),
            slots=(f["slots_in"][:b], f["slots_out"][:b]),
            lens=f[pre + "lens"][:b], positions=per_row(f[pre + "positions"][:b, :t]),
            valid=per_row(f[pre + "valid"][:b, :t]), **kw,
        )  # fmt: skip

    def _forward(self, b: int, t: int, k: int) -> torch.Tensor:
        """The static call: every op reads the buffers, so it can be captured."""
        f = self._bufs
        (_, att, _, _), *enc_views = self._views(b, t, k)
        x = {name: f[name][:b, :, :t] for name in INPUTS if name in f}
        if self.encode is None:
            mu = x["mu"]
        else:
            (_, frm_att, _, _), (_, tok_att, tt, kt) = enc_views
            frm = self._view("", frm_att, b, t, k, rows=1, res="frames", tag="frames")
            tok = self._view("tok_", tok_att, b, tt, kt, rows=1, res="tokens", tag="tokens")
            la = tt + self.lookahead
            enc = EncoderInputs(f["toks"][:b, :la], f["toks_valid"][:b, :la], f["has_ctx"][:b],
                                tok, frm, [])  # fmt: skip
            mu = self.encode(enc).transpose(1, 2)
        past = self._view("", att.flatten(0, 1), b, t, k, rows=2)
        return cfm_euler(
            self.estimator, x["z"], x["mask"], mu, f["spks"][:b], x["cond"], past,
            self.n_steps, self.cfg_rate, times=f["times"],
        )  # fmt: skip

    def _capture(self, key: tuple[int, int, int]) -> None:
        """Warm up and capture on padding only: a run over the real indices would move the
        streams' convolution tails before the replay reads them. Raises CaptureFailed."""
        self._pad(*key)
        self._graphs[key] = self._graph_pool.capture(lambda: self._forward(*key), "the flow")
        self._captured.add(key)
        self.captures += 1
