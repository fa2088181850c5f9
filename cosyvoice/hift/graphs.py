"""HiFT's filter network at static shapes, captured as CUDA graphs (v1/v2).

Between the source's STFT and the inverse STFT (both per item: their edges depend on each
item's own length) HiFT is ~700 small kernels for a streaming chunk: 72 Snake activations,
their convolutions and masks. Launched eagerly they took 16-43 ms of a first chunk on an H200,
so :meth:`HiFT.filter` is captured once per (batch, mel frames) bucket and replayed: the call's
mel and source STFT are copied into zero-padded static buffers with each item's length, and
every convolution's input is masked to that length, as in any batched call. A bucket is
captured when first met (a capture costs about two calls); the frame buckets are a stream's
first three hops' (25, 50 and 100 tokens, each with the 8 mel frames carried over), which the
flow's warm-up runs at every batch bucket, so a final chunk's call, padded to one of them,
captures nothing mid-burst. Calls past the largest bucket (long whole utterances, slow speech)
run eagerly. On the CPU the same static call runs eagerly (``capture=False``): that is how the
padding is tested.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cosyvoice.devices import Calls, GraphPool, bucket

if TYPE_CHECKING:
    from cosyvoice.hift.hift import HiFT

BATCHES = (1, 2, 4, 8, 16, 32, 64)
FRAMES = (64, 128, 256)  # mel frames of a call: hops of 25, 50, 100 tokens (58, 108, 208 frames)


class HiFTGraphs:
    def __init__(self, hift: HiFT, max_batch: int, device: torch.device, calls: Calls,
                 capture: bool | None = None) -> None:  # fmt: skip
        self.hift, self.device = hift, device
        self.batches = [b for b in BATCHES if b < max_batch] + [max_batch]
        self.capture = device.type == "cuda" if capture is None else capture
        self.calls = calls  # HiFT's
        self._bufs: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = GraphPool(device)

    def fits(self, batch: int, frames: int) -> bool:
        return batch <= self.batches[-1] and frames <= FRAMES[-1]

    def run(self, mel: torch.Tensor, s_stft: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """What :meth:`HiFT.filter` gives for the call, computed at its bucket."""
        n, t, nfr = mel.shape[0], mel.shape[-1], s_stft.shape[-1]
        key = (bucket(self.batches, n), bucket(FRAMES, t))
        self._prepare(mel, s_stft)
        if self.capture and key not in self._graphs:  # (over the buffers as they are: finite)
            self._graphs[key] = self._graph_pool.capture(lambda: self._forward(*key), "HiFT")
        self.calls.at_static_shapes(self.capture)  # (after a capture: a failed one is eager)
        b, tb = key
        f = self._bufs
        self._pad(b, tb)
        f["mel"][:n, :, :t] = mel
        f["s_stft"][:n, :, :nfr] = s_stft
        f["frames"][:n] = frames
        if not self.capture:
            return self._forward(b, tb)[:n, :, :nfr]
        graph, out = self._graphs[key]
        graph.replay()
        return out[:n, :, :nfr].clone()  # the next replay overwrites ``out``

    def _nfr(self, t: int) -> int:
        cfg = self.hift.cfg
        return t * cfg.samples_per_frame // cfg.hop_len + 1

    def _prepare(self, mel: torch.Tensor, s_stft: torch.Tensor) -> None:
        """Static buffers at the largest bucket in the inputs' dtypes (new ones: no graph)."""
        b, t = self.batches[-1], FRAMES[-1]
        want = dict(mel=((b, mel.shape[1], t), mel.dtype),
                    s_stft=((b, s_stft.shape[1], self._nfr(t)), s_stft.dtype),
                    frames=((b,), torch.long))  # fmt: skip
        for name, (shape, dtype) in want.items():
            x = self._bufs.get(name)
            if x is None or x.shape != shape or x.dtype != dtype:
                self._bufs[name] = torch.zeros(shape, dtype=dtype, device=self.device)
                self._graphs.clear()
                self._graph_pool.drop()

    def _pad(self, b: int, t: int) -> None:
        f = self._bufs
        f["mel"][:b, :, :t].zero_()
        f["s_stft"][:b, :, : self._nfr(t)].zero_()
        f["frames"][:b].zero_()

    def _forward(self, b: int, t: int) -> torch.Tensor:
        f = self._bufs
        return self.hift.filter(f["mel"][:b, :, :t], f["s_stft"][:b, :, : self._nfr(t)],
                                f["frames"][:b])  # fmt: skip
