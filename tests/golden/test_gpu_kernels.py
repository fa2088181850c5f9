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

from cosyvoice.flow import decoder, dit
from cosyvoice.flow.cache import FlowCache, Past
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
    fast, ref = _both_kernels(lambda: attention(q, k, v, mask[:, None]))
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
