"""The batched LLM step: one decode step does the same number of torch ops at batch 1 and 16
(no per-request work inside the layers), the paged KV pool gets every block back, a cache can
be read back, and the CPU attention path equals SDPA."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from _fixtures import CountOps, load_engine

import cosyvoice
from cosyvoice.devices import (
    PACK_ROWS,
    PackedLinear,
    can_pack_linears,
    linear_add_,
    pack_linears,
)
from cosyvoice.llm import qwen2
from cosyvoice.llm.engine import LLMRequest
from cosyvoice.llm.kv import BLOCK, additive_bias
from cosyvoice.llm.qwen2 import attention

pytestmark = pytest.mark.usefixtures("torch_single_thread")
NEEDS_ONEDNN = pytest.mark.skipif(
    not can_pack_linears(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch"
)


def _started(model, n: int) -> list[LLMRequest]:
    reqs = [
        LLMRequest(text_ids=list(range(10, 17 + 3 * i)), seed=i + 1, min_len=50, max_len=50)
        for i in range(n)
    ]
    model.llm.step(reqs)  # prefill (different lengths)
    model.llm.step(reqs)
    return reqs


def _decode_ops(model, n: int) -> Counter[str]:
    reqs = _started(model, n)
    counter = CountOps()
    with counter, torch.inference_mode():
        model.llm.net.forward_packed(
            model.llm.net.speech_embedding(torch.tensor([r.out_tokens[-1] for r in reqs])),
            [r.cache for r in reqs],
            [1] * n,
        )
    for r in reqs:
        r.cancel()
    return counter.ops


@pytest.mark.parametrize("family", ["cosyvoice1", "cosyvoice2"])
def test_decode_step_ops_do_not_grow_with_batch(golden_dir, family):
    model = load_engine(golden_dir, family)
    one, sixteen = _decode_ops(model, 1), _decode_ops(model, 16)
    n_layers = model.llm_config.qwen.num_hidden_layers if model.llm_config.qwen else 1
    extra = sum(sixteen.values()) - sum(one.values())
    # a few ops of host-side bookkeeping may differ, never anything per request per layer
    assert abs(extra) <= 8, (sum(one.values()), sum(sixteen.values()), sixteen - one)
    assert sum(one.values()) > 5 * n_layers  # the counter saw the layers at all


@pytest.mark.parametrize("kernel", ["cpu", "gpu"])
@pytest.mark.parametrize("n_new", [1, 3])  # a decode step, a prefill
def test_every_layer_reads_one_attention_bias_per_forward(golden_dir, kernel, n_new, monkeypatch):
    """The mask goes into attention as one additive bias per forward, in the compute dtype: a
    bool mask made SDPA build that bias again in every layer (on a GPU three kernels per layer
    of every replayed decode step), and the CPU path masked every layer's scores."""
    model = load_engine(golden_dir, "cosyvoice2")
    seen: list[torch.Tensor] = []
    inner = qwen2._sdpa if kernel == "gpu" else qwen2._matmuls

    def spy(qg, k, v, bias):
        seen.append(bias)
        return inner(qg, k, v, bias)

    reqs = _started(model, 3)
    monkeypatch.setattr(qwen2, "_matmuls", spy)
    net = model.llm.net
    with torch.inference_mode():
        x = net.speech_embedding(torch.tensor([[r.out_tokens[-1]] * n_new for r in reqs]))
        x = x.flatten(0, 1)
        before = x.clone()
        net.forward_packed(x, [r.cache for r in reqs], [n_new] * 3)
    assert torch.equal(x, before), "the layers add into a copy of the input, not into it"
    assert len(seen) == model.llm_config.qwen.num_hidden_layers
    assert all(b is seen[0] for b in seen), "a bias per layer"
    assert seen[0].dtype == model.dtype
    for r in reqs:
        r.cancel()


# per request in a step: views of its row
PER_ROW = ("aten.slice", "aten.select")


def test_a_whole_decode_step_has_no_per_request_kernels(golden_dir):
    """The whole step, inputs and sampling included: per request, only views (a row of the
    batch). Each request's last token was looked up alone before (a copy to the device and an
    embedding kernel per request, 64 of each at batch 64), and each drew from its own generator
    on the host."""
    model = load_engine(golden_dir, "cosyvoice2")

    def step_ops(n: int) -> Counter[str]:
        reqs = _started(model, n)
        counter = CountOps()
        with counter:
            model.llm.step(reqs)
        for r in reqs:
            r.cancel()
        return counter.ops

    one, sixteen = step_ops(1), step_ops(16)
    grown = {op: k for op, k in (sixteen - one).items() if op not in PER_ROW}
    assert not grown, grown
    assert one["aten.topk"] == sixteen["aten.topk"] == 1  # the draw counted, once a step


def test_pool_blocks_come_back(golden_dir):
    model = load_engine(golden_dir, "cosyvoice2")
    pool = model.llm.net.kv_pool()
    before = pool.used_blocks
    reqs = _started(model, 6)
    assert pool.used_blocks > before
    reqs[0].cancel()  # cancelled
    while not reqs[1].done:  # finished by length
        model.llm.step([reqs[1]])
    held = sum(len(r.cache.blocks) for r in reqs[2:])
    assert pool.used_blocks == before + held
    del reqs  # dropped without cancel: garbage collection gives the blocks back
    assert pool.used_blocks == before


def test_pool_grows_for_a_burst_and_shrinks_after(golden_dir):
    model = load_engine(golden_dir, "cosyvoice2")
    pool = model.llm.net.kv_pool()
    first = pool.blocks
    reqs = _started(model, 12)
    burst = [r.cache for r in reqs]
    for c in burst:
        c.reserve(6 * BLOCK)  # more than the first size holds
    assert pool.blocks > first
    del burst
    for r in reqs:
        r.cancel()
    assert pool.blocks == first and pool.used_blocks == 1


def test_cache_is_readable_and_grows_past_a_block(golden_dir):
    model = load_engine(golden_dir, "cosyvoice2")
    net = model.llm.net
    n = 2 * BLOCK + 5
    x = torch.randn(n, net.cfg.llm_input_size, generator=torch.Generator().manual_seed(0))
    whole, pieces = net.new_cache(), net.new_cache()
    with torch.inference_mode():
        h_whole = net.qwen(x, [whole], [n])
        h_last = [net.qwen(x[i : i + 1], [pieces], [1]) for i in range(n)][-1]
    assert len(whole.blocks) == 3 and whole.length == pieces.length == n
    for layer in (0, net.cfg.qwen.num_hidden_layers - 1):
        assert whole.keys(layer).shape == (
            net.cfg.qwen.num_key_value_heads,
            n,
            net.cfg.qwen.head_dim,
        )
        torch.testing.assert_close(whole.keys(layer), pieces.keys(layer), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(whole.values(layer), pieces.values(layer), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_whole[-1:], h_last, atol=1e-5, rtol=1e-4)
    whole.release()
    with pytest.raises(ValueError):
        whole.keys(0)


@pytest.mark.parametrize("stacked", [False, True])  # the bias's rows per query or per head
@pytest.mark.parametrize("kernel", ["cpu", "gpu"])  # the GPU's grouped SDPA, run on the CPU
@pytest.mark.parametrize("lq", [1, 5])  # decode and prefill
def test_grouped_attention_matches_sdpa(lq, kernel, stacked, monkeypatch):
    if kernel == "gpu":
        monkeypatch.setattr(qwen2, "_matmuls", qwen2._sdpa)
    g = torch.Generator().manual_seed(3)
    b, h, n_kv, hd, t = 3, 8, 2, 16, 40
    q = torch.randn(b, lq, h, hd, generator=g)
    k = torch.randn(b, t, n_kv, hd, generator=g)
    v = torch.randn(b, t, n_kv, hd, generator=g)
    past = torch.tensor([0, 10, 30])
    q_pos = past[:, None] + torch.arange(lq)
    mask = (torch.arange(t) <= q_pos[:, :, None]) & (torch.arange(t) < (past + lq)[:, None, None])
    got = attention(q, k, v, additive_bias(mask[:, None], q.dtype, h // n_kv if stacked else 1))
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(h // n_kv, 2).transpose(1, 2),
        v.repeat_interleave(h // n_kv, 2).transpose(1, 2),
        attn_mask=mask[:, None],
    )
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(b, lq, h * hd))


NEEDS_BF16_PACKING = pytest.mark.skipif(
    not can_pack_linears(torch.device("cpu"), torch.bfloat16),
    reason="bf16 packing needs bf16 matrix units (AVX512-BF16/AMX)",
)
# float32 must match to rounding; bfloat16 to bf16's rounding of the last product
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@NEEDS_ONEDNN
@pytest.mark.parametrize("rows", [1, PACK_ROWS])
@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=NEEDS_BF16_PACKING)]
)
def test_packed_linears_compute_what_torch_does(dtype, rows):
    """Whatever row count the weights are laid out for, any row count runs over them: fewer
    and more rows than the layout's, and strided inputs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(72, 200),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(200, 8, False)),
    ).to(dtype)
    xs = [torch.randn(1, 72), torch.randn(17, 72), torch.randn(3, 5, 72), torch.randn(72, 6).t(),
          torch.randn(2 * PACK_ROWS + 3, 72)]  # fmt: skip
    xs = [x.to(dtype) for x in xs]
    with torch.inference_mode():
        expected = [net(x) for x in xs]
        assert pack_linears(net, rows) == 2
        assert not any(isinstance(m, torch.nn.Linear) for m in net.modules())
        for x, e in zip(xs, expected, strict=True):
            got = net(x)
            assert got.dtype == dtype
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(got, e, atol=tol, rtol=tol)


@NEEDS_ONEDNN
@pytest.mark.parametrize("family", ["cosyvoice1", "cosyvoice2"])
def test_load_packs_the_llm_and_the_flow_on_a_cpu_unless_told_not_to(golden_dir, family):
    d = golden_dir / family / "model"
    if not d.is_dir():
        pytest.skip(f"no {family} golden dir")
    for packed in (None, False):
        model = cosyvoice.load(d, "cpu", "float32", speaker_dir=None, packed=packed)
        for net in (model.llm.net, model.token2wav.flow):
            kinds = {type(m) for m in net.modules()}
            assert (PackedLinear in kinds, torch.nn.Linear in kinds) == (
                packed is None,
                packed is False,
            )
        if packed is None:
            with pytest.raises(RuntimeError, match="packed"):
                model.token2wav.flow.to(torch.float64)
    with pytest.raises(RuntimeError, match="packed"):
        cosyvoice.load(d, speaker_dir=None, token2wav=False).llm.net.to(torch.float64)


def _stream_audio(t2w, tokens: list[int]) -> torch.Tensor:
    """One stream's audio from ``tokens`` fed 7 at a time (each chunk reads the flow's state)."""
    emb = torch.randn(t2w.flow.cfg.spk_embed_dim, generator=torch.Generator().manual_seed(0))
    st = t2w.new_state(emb, stream=True, seed=1)
    return torch.cat(list(t2w.stream(st, (tokens[i : i + 7] for i in range(0, len(tokens), 7)))))


@NEEDS_ONEDNN
def test_a_packed_flow_makes_the_audio_torchs_linears_do(golden_dir):
    """The flow's linears packed (the CPU's float32 default) against torch's: the same audio
    to float32 rounding, through a stream's cached chunks (a wrong weight layout would be off
    by the signal's own scale)."""
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    t2ws = [cosyvoice.load(d, "cpu", "float32", speaker_dir=None, packed=p).token2wav
            for p in (None, False)]  # fmt: skip
    vocab = t2ws[0].flow.cfg.vocab_size
    tokens = torch.randint(0, vocab, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        packed, plain = (_stream_audio(t, tokens) for t in t2ws)
    assert packed.shape == plain.shape and plain.abs().max() > 0.01
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=0)


@NEEDS_BF16_PACKING
def test_load_packs_the_llm_in_bfloat16_on_bf16_units(golden_dir):
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    kw = dict(dtype="bfloat16", speaker_dir=None, token2wav=False)
    nets = {p: cosyvoice.load(d, packed=p, **kw).llm.net for p in (None, False)}
    assert any(isinstance(m, PackedLinear) for m in nets[None].modules())
    assert not any(isinstance(m, PackedLinear) for m in nets[False].modules())
    # the same logits as torch's bf16 kernels, to bf16's rounding over a whole forward
    x = nets[False].prefix_embeds(torch.arange(5, 40), torch.arange(3, 12))
    with torch.inference_mode():
        packed, plain = (
            n.forward_packed(x, [n.new_cache(torch.bfloat16)], [len(x)], last_only=False)
            for n in (nets[None], nets[False])
        )
    assert packed.dtype == torch.bfloat16
    # a wrong weight layout would be off by the logits' own scale, not by bf16 rounding
    err = (packed.float() - plain.float()).abs().max() / plain.float().abs().max()
    assert err < 0.05, err


@NEEDS_ONEDNN
def test_linear_add_is_the_residual_plus_the_linear_on_every_path():
    """addmm_ (a plain linear without bias), a packed linear and a biased one (an add_): each
    adds into the residual it returns."""
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 16, generator=g), torch.randn(5, 8, generator=g)
    for bias in (False, True):
        lin = torch.nn.Linear(16, 8, bias=bias)
        with torch.inference_mode():
            want = res + lin(x)
            for m in (lin, PackedLinear(lin)):
                into = res.clone()
                assert linear_add_(m, x, into) is into
                torch.testing.assert_close(into, want)


@NEEDS_ONEDNN
def test_packing_refuses_what_it_was_not_measured_on(golden_dir, monkeypatch):
    import cosyvoice.devices as devices

    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)  # keep 16 bits on this CPU
    with pytest.raises(ValueError, match="packed linears need"):
        cosyvoice.load(d, dtype="float16", speaker_dir=None, token2wav=False, packed=True)
    assert not devices.can_pack_linears(torch.device("cuda"), torch.float32)
    assert devices.can_pack_linears(torch.device("cpu"), torch.bfloat16)
    # emulated bf16 would be slower packed or not, and oneDNN was not measured there
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: False)
    assert not devices.can_pack_linears(torch.device("cpu"), torch.bfloat16)
