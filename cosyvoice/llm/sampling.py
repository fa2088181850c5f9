"""Repetition-aware sampling (RAS, spec §8.4) with a per-request generator.

Deliberate differences from upstream HEAD (spec "bugs"):
* while fewer than ``min_len`` tokens exist, *every* special id (>= speech_token_size) is masked,
  not only id ``speech_token_size`` (which in v3 is sos, not eos);
* randomness comes from the request's own ``torch.Generator``, never the global RNG, so the
  same seed gives the same tokens whatever else runs in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import SamplingConfig


@dataclass
class Draw:
    """One row's draw: the tokens so far (the RAS window), whether every special id (>= the
    speech token size) is masked except ``allow`` (the bistream fill id), and the request's
    generator (None: greedy, argmax)."""

    decoded: list[int]
    ignore_eos: bool
    generator: torch.Generator | None
    allow: int | None = None


def sample_rows(
    logits: torch.Tensor, draws: list[Draw], speech_token_size: int, cfg: SamplingConfig
) -> list[int]:
    """One token per row of ``logits`` (B, V). The row-wise math (log-softmax, masks, top-k in
    stable order) runs once for the batch on the logits' device, so a GPU sends back only B x
    top_k candidates; the top-p cut, each row's draw from its own (CPU) generator and the rare
    RAS fallback run on the CPU. Row-wise kernels give each row the same bits at any batch size,
    so a row's token does not depend on the others."""
    logp = logits.float().log_softmax(-1)
    _mask_specials(logp, draws, speech_token_size)
    out = [0] * len(draws)
    greedy = [i for i, d in enumerate(draws) if d.generator is None]
    if greedy:  # (an empty pick still costs kernels and a wait for the device)
        for i, tok in zip(greedy, pick_rows(logp, greedy).argmax(-1).tolist(), strict=True):
            out[i] = tok
    rows = [i for i, d in enumerate(draws) if d.generator is not None]
    if not rows:
        return out
    sub = pick_rows(logp, rows)
    kept_p, kept_idx, n = nucleus_rows(sub.softmax(-1), cfg.top_p, cfg.top_k)
    tops = _categorical(kept_p, kept_idx, n, [draws[i].generator for i in rows])
    for j, (i, top) in enumerate(zip(rows, tops, strict=True)):
        window = draws[i].decoded[-cfg.win_size :]
        if window.count(top) >= cfg.win_size * cfg.tau_r:
            # fallback: full distribution with the repeated id banned
            scores = sub[j].cpu().clone()  # the generator draws on the CPU; logp stays as is
            scores[top] = float("-inf")
            top = int(torch.multinomial(scores.softmax(0), 1, generator=draws[i].generator))
        out[i] = top
    return out


def _categorical(
    p: torch.Tensor, ids: torch.Tensor, n: list[int], generators: list[torch.Generator]
) -> list[int]:
    """One draw per row among its first n[j] entries of ``p`` (B, k): argmax(p / q) with
    q ~ Exp(1) from the row's generator, the exponential race torch.multinomial(p, 1) runs
    (the same draws and the same token; measured 20000/20000 equal) without its per-call
    overhead, which is most of a batch's sampling time."""
    width = max(n)
    q = torch.ones(len(n), width)
    for j, g in enumerate(generators):
        q[j, : n[j]].exponential_(generator=g)
    live = torch.arange(width) < torch.tensor(n)[:, None]
    pick = (torch.where(live, p[:, :width], 0.0) / q).argmax(-1, keepdim=True)
    return ids.gather(-1, pick)[:, 0].tolist()


def pick_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``; all of them as they are (a decode step's usual case: no index kernel)."""
    return x if len(rows) == x.shape[0] else x[rows]


def _mask_specials(logp: torch.Tensor, draws: list[Draw], speech_token_size: int) -> None:
    rows = [i for i, d in enumerate(draws) if d.ignore_eos]
    if not rows:
        return
    allow_rows = [i for i in rows if draws[i].allow is not None]
    allow_ids = [draws[i].allow for i in allow_rows]
    kept = logp[allow_rows, allow_ids].clone() if allow_rows else None
    if len(rows) == logp.shape[0]:  # in place either way; a slice needs no index kernel
        logp[:, speech_token_size:] = float("-inf")
    else:
        logp[rows, speech_token_size:] = float("-inf")
    if allow_rows:
        logp[allow_rows, allow_ids] = kept


# candidates read back past the k-th: ties at the k-th value (bf16 logits make them) are put in
# order on the host when the window holds all of them
TIE_ROOM = 16


def nucleus_rows(
    probs: torch.Tensor, top_p: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per row of ``probs`` (B, V): the top-k probabilities and ids in upstream's stable
    descending order (lower id first among equal values, also for ties at the k-th value), and
    how many of them the top-p walk keeps: entries while cum < top_p (cum summed in float32 one
    by one, so the first entry is always taken and the one that crosses top_p is included).
    One top-k on the device of ``probs`` and its (B, k + TIE_ROOM) window back on the host,
    where it is put in order; only a tie running past the window selects on the device."""
    k, v = min(top_k, probs.shape[-1]), probs.shape[-1]
    w = min(k + TIE_ROOM, v)
    vals, ids = probs.topk(w, dim=-1)  # descending; equal values in no promised order
    p, i = vals.cpu().numpy(), ids.cpu().numpy()
    if w < v and (p[:, w - 1] == p[:, k - 1]).any():  # the k-th value's ties may go on
        return _nucleus_on_device(probs, top_p, k)
    order = np.lexsort((i, -p), axis=-1)[:, :k]  # by value, then id: all ties are in view
    sorted_p, idx = np.take_along_axis(p, order, -1), np.take_along_axis(i, order, -1)
    return torch.from_numpy(sorted_p), torch.from_numpy(idx), _top_p_counts(sorted_p, top_p)


def _nucleus_on_device(
    probs: torch.Tensor, top_p: float, k: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`nucleus_rows` selecting on the device: every id at or above the k-th value, ties
    at it by lowest id, in a stable sort."""
    vals = probs.topk(k, dim=-1).values
    thr = vals[:, -1:]
    nz = (probs >= thr).nonzero()  # row-major: ascending ids within each row
    if nz.shape[0] != probs.shape[0] * k:  # ties past the k-th value (common from bf16 logits):
        ties = probs == thr  # their lowest ids fill the places left
        room = k - (vals > thr).sum(-1, keepdim=True)
        nz = ((probs > thr) | (ties & (ties.cumsum(-1) <= room))).nonzero()
    idx = nz[:, 1].view(-1, k)  # exactly k per row
    p = probs.gather(-1, idx)
    order = p.argsort(dim=-1, descending=True, stable=True)
    sorted_p, idx = p.gather(-1, order).cpu(), idx.gather(-1, order).cpu()
    return sorted_p, idx, _top_p_counts(sorted_p.numpy(), top_p)


def _top_p_counts(sorted_p: np.ndarray, top_p: float) -> list[int]:
    """How many of each row's candidates the top-p walk keeps."""
    cum = np.cumsum(sorted_p, axis=-1, dtype=np.float32)  # sequential float32 sums
    before = np.concatenate([np.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    return np.maximum((before < np.float32(top_p)).sum(-1), 1).tolist()


def nucleus_candidates(
    probs: torch.Tensor, top_p: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p/top-k candidates (probs, ids) of one distribution (V,), in draw order."""
    p, idx, (n,) = nucleus_rows(probs[None], top_p, top_k)
    return p[0, :n], idx[0, :n]


def sample_next(
    logits: torch.Tensor,
    decoded: list[int],
    speech_token_size: int,
    ignore_eos: bool,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    allow: int | None = None,
) -> int:
    """One row of :func:`sample_rows`: mask specials if ``ignore_eos`` (except ``allow``) and
    draw; ``generator=None`` means greedy (argmax)."""
    draw = Draw(decoded, ignore_eos, generator, allow)
    return sample_rows(logits[None], [draw], speech_token_size, cfg)[0]
