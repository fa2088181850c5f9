"""Linears over the same input run as one: load hooks that keep the checkpoint's keys."""

from __future__ import annotations

import torch
from torch import nn


def fuse(parent: nn.Module, name: str, parts: dict[str, int]) -> None:
    """``parent.<name>``, one Linear, stands for the checkpoint's ``parts`` (linears over the
    same input: q, k and v; gate and up), in that order and with these output sizes: one GEMM
    where there were several, in a step whose time on a GPU is its kernel count. The
    checkpoint's keys stay the module's interface: loading stacks the parts' rows,
    ``state_dict()`` splits them back (hooks on the parent, whose keys they are)."""

    def join(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{p}.{kind}" for p in parts]
            if all(k in state for k in keys):
                state[f"{prefix}{name}.{kind}"] = torch.cat([state.pop(k) for k in keys])

    def split(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
        for kind in ("weight", "bias"):
            whole = state.pop(f"{prefix}{name}.{kind}", None)
            if whole is not None:
                for p, part in zip(parts, whole.split(list(parts.values())), strict=True):
                    state[f"{prefix}{p}.{kind}"] = part  # a view: torch.save keeps one copy

    parent.register_load_state_dict_pre_hook(join)
    parent.register_state_dict_post_hook(split)
