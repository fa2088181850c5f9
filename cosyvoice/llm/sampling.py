"""Repetition-aware sampling (RAS, spec §8.4) as tensor ops on the logits' device.

A decode step's draw is a fixed set of row-wise ops over the logits and one small integer
tensor per row (:meth:`Draw.row`): no host work between the logits and the tokens, no wait for
the device until the tokens come back, and the same ops at every batch size, so a replayed
decode step on a GPU can include its draw. What a row needs from the host (its flags, its RAS
window, two random numbers) is known before the step runs.

Deliberate differences from upstream HEAD (spec "bugs" and serving):
* while fewer than ``min_len`` tokens exist, *every* special id (>= speech_token_size) is masked,
  not only id ``speech_token_size`` (which in v3 is sos, not eos);
* randomness is a function of the request's seed and the step (splitmix64 at the draw's
  number), never the global RNG: the same seed gives the same tokens whatever else
  runs in the batch, and a step that failed and runs again draws the same. Each sampled step
  takes two 24-bit uniforms, and each draw is an inverse-CDF pick with one of them (upstream's
  ``multinomial`` draws from the global RNG);
* the top-p walk's sums are a float64 cumsum, not upstream's one-by-one float32 sum: where
  that lands within a rounding of ``top_p``, the last candidate may differ (2 of 1500 rows of
  700 candidates in the tests, none at top-k 25);
* a RAS fallback with nothing left to draw (the repeated id held all the mass) keeps the
  repeated id, where ``multinomial`` raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SamplingConfig

UNIFORM_BITS = 24  # a float32 uniform's resolution: k / 2**24 is exact in float32
_FLAGS = 5  # greedy, mask specials, allowed special id, two uniforms; then the RAS window
_M64 = (1 << 64) - 1


def uniforms(seed: int, step: int) -> tuple[int, int]:
    """Two 24-bit uniforms for draw ``step`` of a request seeded ``seed``: the top 48 bits of
    splitmix64's output number ``step`` from the mixed seed (a counter-based generator: no
    state to keep, rewind or share between threads; mixing the seed first keeps seeds that
    differ by splitmix64's increment from drawing one stream shifted by a step)."""
    x = _mix((_mix(seed & _M64) + (step + 1) * 0x9E3779B97F4A7C15) & _M64)
    return x >> 40, (x >> 16) & ((1 << UNIFORM_BITS) - 1)


def _mix(x: int) -> int:
    """splitmix64's output function: a 64-bit bijection whose every output bit depends on
    every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@dataclass
class Draw:
    """One row's draw: the tokens so far (the RAS window; its length numbers the draw),
    whether every special id (>= the speech token size) is masked except ``allow`` (the
    bistream fill id), and the request's seed (None: greedy, argmax)."""

    decoded: list[int]
    ignore_eos: bool
    seed: int | None
    allow: int | None = None

    def row(self, cfg: SamplingConfig) -> list[int]:
        """This row's ints for :func:`sample_tokens`."""
        g = self.seed is None
        u = (0, 0) if g else uniforms(self.seed, len(self.decoded))
        window = self.decoded[-cfg.win_size :]
        pad = [-1] * (cfg.win_size - len(window))
        allow = -1 if self.allow is None else self.allow
        return [int(g), int(self.ignore_eos), allow, *u, *window, *pad]


@dataclass(frozen=True)
class Sampler:
    """A model's draw: :func:`sample_tokens` with its speech token size and sampling config."""

    speech_token_size: int
    cfg: SamplingConfig

    @property
    def width(self) -> int:
        """Ints per row of the draw's input (:meth:`Draw.row`)."""
        return _FLAGS + self.cfg.win_size

    def idle_row(self) -> list[int]:
        """The row of a request that draws nothing (its token is forced, or not due): a greedy
        draw with nothing masked and an empty window."""
        return Draw([], ignore_eos=False, seed=None).row(self.cfg)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logits, rows, self.speech_token_size, self.cfg)


def sample_tokens(
    logits: torch.Tensor, rows: torch.Tensor, speech_token_size: int, cfg: SamplingConfig
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V), given each row's ints ``rows`` (B,
    :attr:`Sampler.width`) on the same device: greedy rows take the argmax; the others draw among
    the top-k candidates in upstream's stable order that the top-p walk keeps, and if that
    token is in the row's RAS window, again from the whole distribution with it banned.
    Row-wise ops only: a row's token does not depend on the others."""
    greedy, ignore, allow = rows[:, 0:1], rows[:, 1:2], rows[:, 2:3]
    u = rows[:, 3:5].float() * 2.0**-UNIFORM_BITS  # exact: fewer than 24 bits
    ids = torch.arange(logits.shape[-1], device=logits.device)
    special = (ids >= speech_token_size) & (ids != allow) & (ignore != 0)
    x = logits.float().masked_fill(special, float("-inf"))
    probs = x.softmax(-1)
    p, top = nucleus(probs, cfg.top_p, cfg.top_k)
    tok = top.gather(-1, inverse_cdf(p, u[:, :1]))
    repeats = (rows[:, _FLAGS:] == tok).sum(-1, keepdim=True)
    banned = probs.scatter(-1, tok, 0.0)
    redraw = (repeats >= cfg.win_size * cfg.tau_r) & (banned.sum(-1, keepdim=True) > 0)
    tok = torch.where(redraw, inverse_cdf(banned, u[:, 1:]), tok)
    return torch.where(greedy != 0, x.argmax(-1, keepdim=True), tok)[:, 0]


def nucleus(probs: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``probs`` (B, V): the top-k probabilities and ids in upstream's stable
    descending order (lower id first among equal values, also for ties at the k-th value),
    the probabilities past the top-p walk's last set to 0. The walk keeps entries while the sum
    before them is < top_p: the first always, the one that crosses top_p included.

    The order comes from one top-k over keys that are unique: a non-negative float32's bits
    sort as its value, so (bits, complement of the id) packed in an int64 sorts by value, then
    by lower id (bf16 logits make ties at the k-th value common; a float top-k orders them as
    it likes)."""
    v = probs.shape[-1]
    shift = v.bit_length()
    ids = torch.arange(v, device=probs.device)
    key = (
        probs.view(torch.int32)
        .long()
        .bitwise_left_shift_(shift)
        .bitwise_or_((1 << shift) - 1 - ids)
    )
    top = key.topk(min(top_k, v), dim=-1).indices
    p = probs.gather(-1, top)
    # the sum of the entries before each, in float64: scans that add in another order (CUDA's
    # at batch 1 and at larger batches) then agree on which side of top_p it falls
    before = F.pad(p.double().cumsum(-1)[:, :-1], (1, 0))
    keep = before < top_p
    keep[:, 0] = True  # (also where top_p <= 0)
    return p * keep, top


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of weights ``p`` (B, n), not normalized: the index whose share of the cumulative
    sum holds ``u`` (B, 1) in [0, 1), never one of weight 0 (a row of zeros: 0): (B, 1).

    The first index of weight > 0 whose cumulative sum passes u * total. In float64: u has 24
    bits, so u * total stays below the total (in float32 it rounds up to a subnormal total, as
    a RAS fallback's can be), and a scan that adds in another order (CUDA's at batch 1 is not
    monotone in float32) moves the sums by far less than u's step."""
    cum = p.double().cumsum(-1)
    hit = (cum > u.double() * cum[:, -1:]) & (p > 0)
    return hit.byte().argmax(-1, keepdim=True)  # (the first maximum)


def sample_rows(
    logits: torch.Tensor, draws: list[Draw], speech_token_size: int, cfg: SamplingConfig
) -> list[int]:
    """:func:`sample_tokens` for ``draws`` (one per row of ``logits``), back on the host."""
    rows = torch.tensor([d.row(cfg) for d in draws], device=logits.device)
    return sample_tokens(logits, rows, speech_token_size, cfg).tolist()


def sample_next(
    logits: torch.Tensor,
    decoded: list[int],
    speech_token_size: int,
    ignore_eos: bool,
    cfg: SamplingConfig,
    seed: int | None,
    allow: int | None = None,
) -> int:
    """One row of :func:`sample_rows`: mask specials if ``ignore_eos`` (except ``allow``) and
    draw; ``seed=None`` means greedy (argmax)."""
    draw = Draw(decoded, ignore_eos, seed, allow)
    return sample_rows(logits[None], [draw], speech_token_size, cfg)[0]
