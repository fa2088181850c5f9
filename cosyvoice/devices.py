"""Which device and dtype a model runs in, and the one trap worth refusing.

Defaults: CUDA when a GPU is visible (bfloat16 there), else the CPU in float32. bfloat16 on a
CPU without bf16 matrix units (AVX512-BF16 or AMX) is emulated and several times slower than
float32 (measured on a 2-core AMD EPYC when the GPU-engine issue was filed: one stream RTF 22 vs
6.5; four streams 391 s vs 98 s),
so such a request falls back to float32 with a warning. On a CPU that has them (an Intel Xeon
with AMX; a Zen 4 AMD EPYC, whose AVX512-BF16 ran a bf16 decode step in 43 ms against 60 in
float32) bfloat16 is the faster choice, but float32 stays the default there: the reference
numbers are checked in it.
"""

from __future__ import annotations

import bisect
import logging
import platform
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("cosyvoice")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which bf16 matmuls are faster than float32."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private helpers moved: read the flags ourselves
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, not {dtype!r}")
        dtype = DTYPES[dtype]
    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_bf16_units():
        log.warning(
            "%s on a CPU without bf16 matrix units (AVX512-BF16/AMX) is several times slower "
            "than float32: using float32",
            dtype,
        )
        return torch.float32
    return dtype


def h2d(x: torch.Tensor | list, device: torch.device | str) -> torch.Tensor:
    """Host data (a tensor or a list) on ``device`` without making the host wait for the
    device: on CUDA through pinned memory with a non-blocking copy, queued behind the stream's
    work (a plain ``.to("cuda")`` or ``torch.tensor(..., device="cuda")`` synchronizes the
    stream first, so the host could not queue the next kernels meanwhile)."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def h2d_into(dst: torch.Tensor, data: list) -> None:
    """Host ints or floats ``data`` (a flat list) into the start of the 1-D ``dst`` as one
    copy: on CUDA from pinned memory without making the host wait (as :func:`h2d`), straight
    into the buffer (no device tensor of its own to copy from)."""
    src = torch.tensor(data, dtype=dst.dtype)
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst[: src.numel()].copy_(src, non_blocking=True)


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` applies: an x86 CPU with oneDNN, in float32, or in bfloat16
    where the CPU has bf16 matrix units. CUDA and ARM builds (oneDNN over ACL) keep torch's own
    kernels: the packed path was only measured against torch's on x86."""
    return (
        device.type == "cpu"
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16_units()))
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# The row count oneDNN lays a packed weight out for (any row count runs over it). On a 2-core Xeon
# (AMX) a layout for 64 rows made float32 CosyVoice2 decode steps 1.78x faster at batch 8 and
# 1.29x at 16 than one for a single row, 4% slower at batch 1 (bf16: 1.21x at 8, the same at 1
# and 16); layouts for up to 32 rows multiplied 16 rows as slowly as the one-row layout
# (bench/bench_llm.py --pack-ab --pack-rows). On the AMD EPYC the one-row layout had been as
# fast as those for 16 rows and for a prefill's length.
PACK_ROWS = 64


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is kept in oneDNN's blocked layout.

    ``F.linear`` on a CPU multiplies by the transposed row-major weight through MKL's sgemm,
    which reads it at half the memory bandwidth for a single row and runs skinny batches far
    from peak; oneDNN's kernel over a weight packed once at load made the LLM's decode steps
    1.2-1.9x faster on an AMD EPYC (batches of 1-64; ``bench/bench_llm.py --pack-ab``), and a
    flow call in float32 1.05-1.18x (``bench/bench_token2wav.py --pack-ab``). The
    packed tensor is opaque (no storage, no state_dict, no ``.to``), so it is a plain attribute
    and the module is built last, after the net reached its device and dtype."""

    def __init__(self, linear: nn.Linear, rows: int = PACK_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: would silently not apply
        raise RuntimeError("a packed linear cannot change device or dtype: pack after .to()")


def linear_add_(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual += linear(x)`` for rows ``x`` (N, in); returns ``residual``. For a plain
    linear without bias one in-place ``addmm_``: the matmul adds into ``residual`` (a GEMM
    with beta = 1), where the linear and the sum were two kernels (an out-of-place addmm
    first copies its 2-D input into the result: a copy and a GEMM). On a GPU a decode step
    costs its kernel count. A :class:`PackedLinear` adds apart: oneDNN's add post-op was no
    faster (2-core Xeon)."""
    if type(linear) is nn.Linear and linear.bias is None and x.dim() == 2:
        return residual.addmm_(x, linear.weight.t())
    return residual.add_(linear(x))


def pack_linears(net: nn.Module, rows: int = PACK_ROWS) -> int:
    """Swap every ``nn.Linear`` in ``net`` for a :class:`PackedLinear` laid out for ``rows``;
    returns how many. Code that needs a packed net's dtype or device reads them from a
    non-linear parameter."""
    swaps = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, rows))
    return len(swaps)


def store_in(net: nn.Module, dtype: torch.dtype) -> None:
    """Keep the weights and biases of ``net``'s linears and convolutions in ``dtype``, for a net
    that runs under autocast to ``dtype`` and inference_mode: there autocast's weight cache does
    not apply, so it cast every weight again at every op call (29% of a bf16 flow call on a
    CPU). The results stay the same bit for bit: autocast runs these ops in ``dtype`` over the
    same rounded weights, and what it leaves alone (norms, embeddings) keeps float32."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)


def bucket(ladder: Sequence[int], n: int) -> int:
    """The smallest of ``ladder`` (ascending) that holds ``n``: a CUDA graph's static size."""
    return ladder[bisect.bisect_left(ladder, n)]


class Calls(Counter):
    """A graph owner's calls by how they ran: ``replayed`` (a captured CUDA graph),
    ``static`` (at a graph's static shapes but eagerly: on a CPU, or while a bucket waits for
    its capture) or ``dynamic`` (eagerly at the call's own shapes: graphs off, or no bucket
    holds the call). The owner keeps it: it outlives graphs that are dropped."""

    MODES = ("replayed", "static", "dynamic")

    def at_static_shapes(self, replayed: bool) -> None:
        self["replayed" if replayed else "static"] += 1

    @property
    def static_runs(self) -> int:
        """Calls at the static shapes, replayed or not."""
        return self["replayed"] + self["static"]


class CaptureFailed(RuntimeError):
    """A CUDA graph's capture failed (on padding only: no stream's state moved); its owner
    goes on eagerly."""


class GraphPool:
    """What one owner's CUDA graphs are captured with, made at its first capture: the memory
    pool they share (captured largest first, smaller graphs reuse its memory) and a stream of
    their own (see :func:`capture_graph`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._mempool: tuple | None = None
        self._stream: torch.cuda.Stream | None = None

    def capture(self, fn: Callable[[], torch.Tensor], owner: str | None = None):
        """:func:`capture_graph` of ``fn`` in this pool. With ``owner`` named, whatever stops
        the capture is logged and raised as :class:`CaptureFailed` (``owner`` goes on
        eagerly)."""
        try:
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            return capture_graph(fn, self._mempool, self._stream)
        except Exception as e:
            if owner is None:
                raise
            log.exception("capturing %s's CUDA graph failed; %s runs eagerly", owner, owner)
            raise CaptureFailed(str(e)) from e

    def drop(self) -> None:
        """Forget the memory pool, with the graphs the owner drops: a pool handle whose graphs
        are all gone cannot take a new capture."""
        self._mempool = None


def capture_graph(
    fn: Callable[[], torch.Tensor], mempool: tuple, stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn`` run once eagerly, then captured as a CUDA graph: its graph and output (the static
    tensor each replay rewrites). Both on ``stream``, one per graph owner: the eager run makes
    cuBLAS's workspace for that stream outside the graph's memory, and two owners' graphs
    replayed at once on different streams never share one. ``thread_local``: other threads go
    on syncing and allocating meanwhile. The caller's stream is current again afterwards, and
    waits for ``stream``, even when the capture fails to begin or end."""
    # on the graph's device: a model on cuda:1 queued its inputs on that device's current
    # stream, which the capture must wait for, whichever device this thread has current
    with torch.cuda.device(stream.device):
        caller = torch.cuda.current_stream()
        stream.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):  # allocator, kernels, lazily grown buffers
                fn()
            # capture_begin/end as torch.cuda.graph does, without what it does first: a device
            # sync and emptying the device's and pinned host memory caches. Graphs met first
            # mid-burst (a final chunk's shape) are captured while other streams run; those
            # stalled every stream and made the next allocations go to the driver again.
            with _no_cast_cache(stream.device.type), torch.cuda.stream(stream):
                graph.capture_begin(mempool, capture_error_mode="thread_local")
                try:
                    out = fn()
                finally:
                    graph.capture_end()
        finally:
            torch.cuda.set_stream(caller)
            # also after a failure: the warm-up may have grown the flow pool's tensors on
            # ``stream``, and the eager fallback on the caller's stream must see those copies
            caller.wait_stream(stream)
    return graph, out


def _no_cast_cache(device_type: str):
    """Autocast as it is, without its cache of cast weights: cached casts made during a capture
    would live in the graph's memory and be freed when autocast exits."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)
