"""Repetition-aware sampling (RAS, spec §8.4) with a per-request generator.

Deliberate differences from upstream HEAD (spec "bugs"):
* while fewer than ``min_len`` tokens exist, *every* special id (>= speech_token_size) is masked,
  not only id ``speech_token_size`` (which in v3 is sos, not eos);
* randomness comes from the request's own ``torch.Generator``, never the global RNG, so the
  same seed gives the same tokens whatever else runs in the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import SamplingConfig


def nucleus_candidates(
    probs: torch.Tensor, top_p: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kept probs, their ids) as upstream's walk over the stable descending sort does:
    take entries while cum < top_p and count < top_k (cum summed in float32, one by one), so
    the first entry is always taken and the one that crosses top_p is included.

    Only the first top_k sorted entries can be kept, so instead of sorting the whole vocabulary
    we take the top_k values and rebuild the stable order (lower id first among equal values,
    also for ties at the k-th value).
    """
    k = min(top_k, probs.numel())
    thr = probs.topk(k).values[-1]
    above = (probs > thr).nonzero().flatten()
    ties = (probs == thr).nonzero().flatten()[: k - above.numel()]
    idx = torch.cat([above, ties])  # ascending ids within each group
    p = probs[idx]
    order = p.argsort(descending=True, stable=True)
    sorted_p, sorted_idx = p[order], idx[order]
    limit = np.float32(top_p)
    cum = np.float32(0.0)
    n = 0
    for v in sorted_p.tolist():
        if not cum < limit:
            break
        n += 1
        cum = np.float32(cum + np.float32(v))
    n = max(n, 1)
    return sorted_p[:n], sorted_idx[:n]


def ras_sample(
    logp: torch.Tensor,
    decoded: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator,
) -> int:
    """One RAS draw from log-probs ``logp`` (V,) float32 on CPU."""
    probs = logp.softmax(0)
    kept_p, kept_idx = nucleus_candidates(probs, cfg.top_p, cfg.top_k)
    top = int(kept_idx[torch.multinomial(kept_p, 1, generator=generator)])
    window = decoded[-cfg.win_size :]
    if window.count(top) >= cfg.win_size * cfg.tau_r:
        # fallback: full distribution with the repeated id banned
        scores = logp.clone()
        scores[top] = float("-inf")
        top = int(torch.multinomial(scores.softmax(0), 1, generator=generator))
    return top


def sample_next(
    logits: torch.Tensor,
    decoded: list[int],
    speech_token_size: int,
    ignore_eos: bool,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    allow: int | None = None,
) -> int:
    """Mask specials if ``ignore_eos`` (except ``allow``, the bistream fill id) and draw;
    ``generator=None`` means greedy (argmax)."""
    logp = logits.float().log_softmax(-1)
    if ignore_eos:
        keep = logp[allow].clone() if allow is not None else None
        logp = logp.clone()
        logp[speech_token_size:] = float("-inf")
        if keep is not None:
            logp[allow] = keep
    if generator is None:
        return int(logp.argmax())
    return ras_sample(logp, decoded, cfg, generator)
