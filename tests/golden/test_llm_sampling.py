"""Sampling rules of spec §8.4 (no fixture records sampled tokens: upstream was patched to argmax
for the goldens), checked against a literal re-statement of the rules. The draw runs on the test
device (the GPU benchmark's parity run: its top-k, scans and scatter there)."""

from __future__ import annotations

import pytest
import torch
from _fixtures import TEST_DEVICE

from cosyvoice.config import SamplingConfig
from cosyvoice.llm.sampling import (
    Draw,
    inverse_cdf,
    nucleus,
    sample_next,
    sample_rows,
    uniforms,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _walk(probs: torch.Tensor, top_p: float, top_k: int) -> list[int]:
    """The spec's words: stable descending sort; add while cum < top_p and count < top_k."""
    sp, si = probs.sort(descending=True, stable=True)
    kept: list[int] = []
    cum = torch.tensor(0.0)
    for p, i in zip(sp, si.tolist(), strict=True):
        if not (cum < top_p and len(kept) < top_k):
            break
        kept.append(i)
        cum = cum + p
    return kept


def _distributions(case: str, n: int = 150) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    rows = []
    for _ in range(n):
        logits = torch.randn(700, generator=g) * float(0.3 + 6 * torch.rand(1, generator=g))
        if case == "ties":
            logits[:400] = logits[3]
        elif case == "masked":
            logits[40:] = float("-inf")
        elif case == "peaked":
            logits[17] = 40.0
        elif case == "bf16":  # short runs of equal values, at the k-th one too
            logits = logits.bfloat16().float()
        rows.append(logits.softmax(0))
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["plain", "ties", "masked", "peaked", "bf16"])
def test_nucleus_matches_spec_walk(case):
    probs = _distributions(case)
    for top_p, top_k in [(0.8, 25), (0.5, 3), (0.99, 700)]:
        p, ids = (t.cpu() for t in nucleus(probs.to(TEST_DEVICE), top_p, top_k))  # all at once
        for row, row_p, row_ids in zip(probs, p, ids, strict=True):
            got, want = row_ids[row_p > 0].tolist(), _walk(row, top_p, top_k)
            assert got == row_ids[: len(got)].tolist()  # kept: a prefix
            if got != want:  # only where the walk's float32 sum is within a rounding of top_p
                short, long = sorted((got, want), key=len)
                assert long[: len(short)] == short and len(long) == len(short) + 1
                assert abs(row[short].double().sum() - top_p) < 1e-5


def test_batched_rows_draw_what_each_row_draws_alone():
    """sample_rows over a batch mixing sampled, greedy, min_len-masked and bistream (allow)
    rows gives each row the token sample_next gives it alone with the same seed."""
    cfg, s = SamplingConfig(), 600
    logits = torch.log(_distributions("plain", 40)) * 0.5
    logits[::7, s + 1] = 30.0  # a stop id that wins wherever specials are not masked
    logits = logits.to(TEST_DEVICE)

    def draws(it: int) -> list[Draw]:
        out = []
        for i in range(len(logits)):
            g = None if i % 5 == 0 else i + 1000 * it
            out.append(Draw([i % 9] * (i % 12), i % 3 == 0, g, s + 2 if i % 6 == 0 else None))
        return out

    for it in range(3):
        batch = sample_rows(logits, draws(it), s, cfg)
        alone = [sample_next(lg, d.decoded, s, d.ignore_eos, cfg, d.seed, d.allow)
                 for lg, d in zip(logits, draws(it), strict=True)]  # fmt: skip
        assert batch == alone
        assert any(t >= s for t in batch) and any(t < s for t in batch)


def test_ras_fallback_bans_repeated_token():
    cfg = SamplingConfig()  # top_p 0.8, top_k 25, win 10, tau_r 0.1 -> any repeat in 10
    logp = torch.full((50,), -20.0)
    logp[7] = 0.0  # ~certain under top-p/top-k
    logp = logp.log_softmax(0).to(TEST_DEVICE)
    assert sample_next(logp, [1, 2, 3], 50, False, cfg, 0) == 7
    got = {sample_next(logp, [7, 1, 2], 50, False, cfg, seed) for seed in range(200)}
    assert 7 not in got and len(got) > 5  # full-distribution fallback, 7 banned
    # outside the window (11 tokens back) the token is allowed again
    assert sample_next(logp, [7] + [1] * 10, 50, False, cfg, 0) == 7
    # nothing left to draw once 7 is banned: 7 stays (multinomial raised)
    only = torch.full((50,), float("-inf"))
    only[7] = 0.0
    assert sample_next(only.to(TEST_DEVICE), [7, 7], 50, False, cfg, 0) == 7


def test_min_len_masks_every_special_and_seed_reproducible():
    cfg = SamplingConfig()
    s = 40
    logits = torch.zeros(s + 3)
    logits[s + 1] = 50.0  # the second stop id: upstream HEAD would let it through
    assert sample_next(logits, [], s, True, cfg, None) < s
    assert sample_next(logits, [], s, False, cfg, None) == s + 1
    torch.manual_seed(0)
    lg = torch.randn(s + 3).to(TEST_DEVICE)
    a = [sample_next(lg, [1] * k, s, True, cfg, 9) for k in range(12)]
    torch.manual_seed(1)  # the global RNG must not matter
    b = [sample_next(lg, [1] * k, s, True, cfg, 9) for k in range(12)]
    assert a == b and len(set(a)) > 1  # (the draw's number changes the draw)


def test_draws_follow_the_kept_distribution():
    """Over many seeds, each kept candidate comes up in proportion to its probability
    renormalized over the top-p set, and nothing outside it comes up."""
    cfg, s = SamplingConfig(top_p=0.9, top_k=6), 100
    logits = torch.tensor([3.0, 2.5, 2.5, 2.0, 1.0, 0.5, 0.0] + [-1.0] * (s - 7))
    p, ids = nucleus(logits.softmax(0)[None], cfg.top_p, cfg.top_k)
    kept = {int(i): float(q) for i, q in zip(ids[0], p[0] / p[0].sum(), strict=True) if q > 0}
    n = 6000
    got = sample_rows(
        logits.to(TEST_DEVICE).expand(n, -1), [Draw([], False, seed) for seed in range(n)], s, cfg
    )
    assert set(got) == set(kept)
    for tok, q in kept.items():
        share = got.count(tok) / n
        assert abs(share - q) < 4 * (q * (1 - q) / n) ** 0.5 + 1e-3, (tok, share, q)


def test_inverse_cdf_never_picks_a_zero_weight():
    top = (2**24 - 1) / 2**24  # the largest u
    tiny = 2.0**-140  # a subnormal total, as a RAS fallback's can be: u * total rounds up
    for scale in (1.0, tiny):
        p = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0]], device=TEST_DEVICE) * scale
        for u, want in [(0.0, 1), (0.29, 1), (0.31, 3), (top, 3)]:
            assert inverse_cdf(p, torch.tensor([[u]], device=TEST_DEVICE)).item() == want


def test_masked_specials_let_the_allowed_id_through():
    """While specials are masked (before min_len, a streaming request's speech), the one id
    allowed (the bistream fill) can still be drawn and the others cannot."""
    cfg, s = SamplingConfig(), 40
    logits = torch.zeros(s + 3)
    logits[s + 2] = 50.0  # the fill id, far ahead
    logits[s + 1] = 49.0  # a stop id, next
    logits = logits.to(TEST_DEVICE)
    for seed in (None, 1, 2):
        assert sample_next(logits, [], s, True, cfg, seed, allow=s + 2) == s + 2
        assert sample_next(logits, [], s, True, cfg, seed) < s
    assert sample_next(logits, [], s, False, cfg, None) == s + 2  # unmasked, greedy


def test_a_top_p_of_zero_keeps_the_first_candidate():
    probs = _distributions("plain", 5)
    p, ids = nucleus(probs.to(TEST_DEVICE), 0.0, 25)
    assert ((p > 0).sum(-1) == 1).all() and (p[:, 0] > 0).all()
    assert ids[:, 0].cpu().tolist() == probs.argmax(-1).tolist()


def test_uniforms_are_spread_and_seeds_draw_unrelated_streams():
    """24-bit uniforms, about uniform over many seeds; a seed's stream is no other seed's
    shifted by a step (seeds that differ by splitmix64's increment would be, unmixed)."""
    us = [u for seed in range(2000) for u in uniforms(seed, 3)]
    assert all(0 <= u < 2**24 for u in us)
    assert abs(sum(us) / len(us) / 2**24 - 0.5) < 0.02
    inc = 0x9E3779B97F4A7C15
    one = [uniforms(5, k) for k in range(1, 40)]
    assert one != [uniforms((5 + inc) % 2**64, k) for k in range(39)]
    assert len(set(one)) == len(one)
