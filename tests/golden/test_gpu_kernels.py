"""On CUDA (bench/bench_gpu.py runs these there; they skip on the CPU): the attention calls of
the full-size models take SDPA's memory-efficient kernel, in float32 and under bf16 autocast,
and give what the math kernel gives. Flash takes no mask, and the math kernel writes every
score out: a change of shape, stride or mask dtype that sends them there fails here (SDPA
raises where a kernel it is limited to refuses its inputs)."""

from __future__ import annotations

import pytest
import torch
from _fixtures import TEST_DEVICE
from torch.nn.attention import SDPBackend, sdpa_kernel

import cosyvoice
from cosyvoice.flow import decoder, dit
from cosyvoice.flow.cache import FlowCache, Past
from cosyvoice.llm.kv import additive_bias
from cosyvoice.llm.qwen2 import attention

pytestmark = pytest.mark.skipif(TEST_DEVICE == "cpu", reason="the GPU's attention kernels")
DTYPES = [torch.float32, torch.bfloat16]


def _both_kernels(fn):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        fast = fn()
    with sdpa_kernel(SDPBackend.MATH):
        ref = fn()
    return fast.float(), ref.float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [1, 7])  # decode and prefill
def test_llm_attention_takes_the_memory_efficient_kernel(dtype, lq):
    g = torch.Generator(TEST_DEVICE).manual_seed(0)
    b, h, n_kv, hd, t = 5, 14, 2, 64, 96  # Qwen2-0.5B's heads; keys in whole 32-key blocks

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=TEST_DEVICE).to(dtype)

    q, k, v = rand(b, lq, h, hd), rand(b, t, n_kv, hd), rand(b, t, n_kv, hd)
    past = torch.tensor([0, 10, 30, 60, 88], device=TEST_DEVICE)[:, None]
    q_pos = past + torch.arange(lq, device=TEST_DEVICE)
    keys = torch.arange(t, device=TEST_DEVICE)
    mask = (keys <= q_pos[..., None]) & (keys < past[..., None] + lq)
    bias = additive_bias(mask[:, None], dtype, h // n_kv)
    fast, ref = _both_kernels(lambda: attention(q, k, v, bias))
    torch.testing.assert_close(fast, ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("module", ["v2", "v3"])
def test_flow_attention_takes_the_memory_efficient_kernel(dtype, module):
    torch.manual_seed(0)
    if module == "v2":  # the estimator's shapes: 256 channels, 8 heads of 64
        attn, dim = decoder.Attention(256, 8, 64), 256
    else:  # DiT's: 1024 channels, 16 heads of 64
        attn, dim = dit.Attention(1024, 16, 64), 1024
    attn = attn.to(TEST_DEVICE).eval()
    lens, streaming = [75, 50, 23], [True, False, True]  # ragged, keys not a multiple of 8
    past = Past([FlowCache() for _ in lens], [0] * 3, lens, streaming, 25, rows=2,
                device=TEST_DEVICE)  # fmt: skip
    x = torch.randn(2 * len(lens), max(lens), dim, device=TEST_DEVICE)
    freqs = torch.randn(2 * len(lens), max(lens), 64, device=TEST_DEVICE)

    def run():
        with torch.autocast("cuda", dtype, enabled=dtype != torch.float32), torch.no_grad():
            return attn(x, past) if module == "v2" else attn(x, past, freqs)

    fast, ref = _both_kernels(run)
    torch.testing.assert_close(fast, ref, atol=3e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_graph_calls_never_wait_for_the_device(golden_dir, monkeypatch):
    """Streams through the model with every graph owner's call (a decode step, first inputs, a
    flow call, a HiFT call) under torch's sync debug mode: a stray host synchronization there
    (a scalar read back, a pageable copy, a shape that depends on data) raises. One would stall
    the host at every replay until the GPU drained its queue, so nothing is queued ahead while
    the GPU runs. Captures are left out: a capture synchronizes by design."""
    from cosyvoice.flow import graphs as flow_graphs
    from cosyvoice.hift import graphs as hift_graphs
    from cosyvoice.llm import graphs as llm_graphs
    from cosyvoice.utterance import Status

    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    calls: dict[str, int] = {}
    errors: list[str] = []

    def checked(name, fn):
        def run(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **k)
            except RuntimeError as e:
                if "synchroniz" in str(e):  # (a failed capture is its own error)
                    errors.append(f"{name}: {e}")
                raise
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return run

    def unchecked(fn):
        def run(*a, **k):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        return run

    for mod in (llm_graphs, flow_graphs, hift_graphs):
        monkeypatch.setattr(mod, "capture_graph", unchecked(mod.capture_graph))
    model = cosyvoice.load(
        d, device=TEST_DEVICE, speaker_dir=None, vocoder_thread=False, max_batch=4
    )  # fmt: skip (a few buckets to capture at warm-up)
    model.warmup()
    for owner, name in ((model.llm.graphs, "run"), (model.llm.graphs, "run_prefill"),
                        (model.token2wav.flow.graphs, "run"), (model.token2wav.hift.graphs, "run")):  # fmt: skip
        monkeypatch.setattr(owner, name, checked(f"{type(owner).__name__}.{name}",
                                                 getattr(owner, name)))  # fmt: skip
    spk = model.speakers.list()[0]
    utts = [model.start(spk, seed=k + 1, fixed_tokens=60) for k in range(3)]
    for u in utts:
        model.add_text(u, "Hello there, this is a test.")
        model.close_text(u)
    failed = []
    while live := [u for u in utts if u.status is not Status.FINISHED]:
        failed += [o.error for o in model.step(live) if o.error]
    assert not errors, errors
    assert not failed, failed
    assert set(calls) == {"DecodeGraphs.run", "DecodeGraphs.run_prefill", "FlowGraphs.run",
                          "HiFTGraphs.run"}, calls  # fmt: skip
