"""Fixture loading shared by the per-family golden test modules (test_e2e*, test_flow,
test_hift, test_token2wav) and the engine-level tests: where a family's fixtures live, the
per-family parameters with their skip-if-missing mark, the one-thread mark, the npz / json / yaml
loaders, the token2wav ragged-batch driver, the engine loader and a torch op counter.

Imported as a plain module (``from _fixtures import ...``): tests/golden is not a package and
pytest puts it on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from golden.conftest import resolve_golden_dir
from torch.utils._python_dispatch import TorchDispatchMode

# wetext is in the project's dependencies; a bare GPU box running the parity tests on CUDA
# (bench/gpu_device.sh) may lack it. The fixture texts normalize the same without it, except
# numbers ("42" -> "forty two" with it, "forty-two" without): test_e2e skips those.
WETEXT = importlib.util.find_spec("wetext") is not None


# The device the model-level golden tests load on (bench/bench_gpu.py runs them on cuda).
TEST_DEVICE = os.environ.get("COSYVOICE_TEST_DEVICE", "cpu")


def family_dir(name: str) -> Path:
    """The folder of one family's fixtures, e.g. ``family_dir("cosyvoice2")``."""
    return resolve_golden_dir() / name


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip unless the fixture file ``path`` exists."""
    return pytest.mark.skipif(not path.is_file(), reason=f"no golden fixtures at {path.parent}")


# One intra-op thread for a module's tiny-model tests (see conftest.torch_single_thread).
ONE_THREAD = pytest.mark.usefixtures("torch_single_thread")

# family -> the folder of its fixtures (golden README layout) and its model yaml's name
FAMILIES = {
    f: family_dir(d)
    for f, d in {"v1": "cosyvoice1", "v2": "cosyvoice2", "v3": "cosyvoice3"}.items()
}
FAMILY_YAML = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}


def family_params(fixture: str, *families: str) -> list:
    """One ``pytest.param(family)`` per family (id = family), skipped unless that family's
    ``fixture`` file exists. For ``parametrize("family", ..., indirect=True, scope="module")``
    with conftest's ``family`` fixture."""
    return [pytest.param(f, id=f, marks=needs(FAMILIES[f] / fixture)) for f in families]


class _TagBlindLoader(yaml.SafeLoader):
    """SafeLoader that reads every HyperPyYAML tag (``!new:``, ``!name:``, ``!apply:``, ``!ref``)
    as the plain node under it."""


def _untagged(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TagBlindLoader.add_multi_constructor("!", _untagged)
_REF = re.compile(r"<(\w+)>")


def raw_yaml(path: Path) -> dict[str, Any]:
    """A CosyVoice yaml as plain data, read without ``cosyvoice.config``: tags are ignored and
    ``!ref`` expressions stay strings (resolve them with :func:`yaml_value`). Tests compare what
    the code parsed against this independent reading."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TagBlindLoader)  # noqa: S506


def yaml_value(raw: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` of :func:`raw_yaml` data, with a reference to top-level keys
    (``<chunk_size>`` or a product such as ``<chunk_size> * <token_mel_ratio>``, the only forms
    the CosyVoice yamls use for numbers) resolved."""
    v: Any = raw
    for k in dotted.split("."):
        v = v[k]
    return _resolve(raw, v)


def _resolve(raw: dict[str, Any], v: Any) -> Any:
    if not (isinstance(v, str) and _REF.search(v)):
        return v
    factors = []
    for term in v.split("*"):
        m = _REF.fullmatch(term.strip())
        if m is None:
            raise ValueError(f"unsupported !ref expression {v!r}")
        factors.append(_resolve(raw, raw[m.group(1)]))
    return factors[0] if len(factors) == 1 else math.prod(factors)


def load_arrays(path: Path) -> dict:
    """An npz file as a dict of numpy arrays."""
    return dict(np.load(path))


def load_tensors(path: Path) -> dict:
    """An npz file as a dict of torch tensors."""
    import torch

    return {k: torch.from_numpy(v) for k, v in np.load(path).items()}


def e2e_runs(d: Path, version: str) -> list[dict]:
    """The ``e2e_sft`` run list of ``<d>/fixtures_<version>.json`` ([] if the npz is missing)."""
    if not (d / "e2e_sft.npz").is_file():
        return []
    return json.loads((d / f"fixtures_{version}.json").read_text())["e2e_sft"]["runs"]


def run_params(families: dict[str, Path], keep=lambda family, run: True) -> list:
    """(family, run) params over the e2e runs that ``keep``; a family without fixtures (or
    without a kept run) gives one skipped param, so the test shows up as skipped."""
    out = []
    for f, d in families.items():
        mark = needs(d / "e2e_sft.npz")
        runs = [r for r in e2e_runs(d, f) if keep(f, r)]
        out += [pytest.param(f, r, id=f"{f}-{r['key']}", marks=mark) for r in runs]
        if not runs:
            out.append(pytest.param(f, None, id=f, marks=mark))
    return out


def drive_ragged(t2w, states, toks: list[int], rates: list[int]):
    """Drive ``states`` together through ``t2w.step`` with ragged token arrival: request i gets the
    next ``rates[i]`` tokens of ``toks`` each step (finalised with its last ones) until all are
    done. Returns (each request's emitted chunks, how many steps emitted more than one chunk)."""
    got: list[list] = [[] for _ in states]
    pos = [0] * len(states)
    n_batched_steps = 0
    while not all(s.done for s in states):
        items, idx = [], []
        for i, s in enumerate(states):
            if s.done:
                continue
            new = toks[pos[i] : pos[i] + rates[i]]
            pos[i] += len(new)
            items.append((s, new, pos[i] >= len(toks)))
            idx.append(i)
        outs = t2w.step(items)
        n_batched_steps += sum(o is not None for o in outs) > 1
        for i, o in zip(idx, outs, strict=True):
            if o is not None:
                got[i].append(o)
    return got, n_batched_steps


def load_engine(golden_dir: Path, name: str):
    """``cosyvoice.load`` of ``<golden_dir>/<name>/model`` without a speaker dir; skips the test
    when that folder is missing."""
    import cosyvoice

    d = golden_dir / name / "model"
    if not d.is_dir():
        pytest.skip(f"no {name} golden dir")
    return cosyvoice.load(d, speaker_dir=None)


def flow_input(fx, case: str, n_tok: int | None = None, streaming=False, finalize=True):
    """A ``FlowInput`` from a flow.npz (numpy arrays or tensors), as the golden README describes
    the cases: B and D carry the zero-shot prompt (with ``prompt_embedding``), the others have no
    prompt and ``embedding``. ``n_tok`` keeps only the first tokens."""
    import torch

    from cosyvoice.flow import FlowInput

    tok = torch.as_tensor(fx["token"][0])
    if n_tok is not None:
        tok = tok[:n_tok]
    if case in ("B", "D"):
        prompt_token = torch.as_tensor(fx["prompt_token"][0])
        prompt_feat = torch.as_tensor(fx["prompt_feat"][0])
        emb = torch.as_tensor(fx["prompt_embedding"][0])
    else:
        prompt_token, prompt_feat = torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)
        emb = torch.as_tensor(fx["embedding"][0])
    return FlowInput(tok, prompt_token, prompt_feat, emb, streaming, finalize)


def assert_chunks_match(chunks, fx, key: str, n_chunks: int, tol: float) -> None:
    """``chunks`` (1-D tensors) are the fixture's ``<key>_chunk<i>_speech`` waveforms: the same
    count (also ``n_chunks``, from the json), shapes, and max abs error <= ``tol``."""
    import re

    refs = [k for k in fx if re.fullmatch(rf"{key}_chunk\d+_speech", k)]
    assert len(chunks) == len(refs) == n_chunks
    for i, c in enumerate(chunks):
        ref = fx[f"{key}_chunk{i}_speech"][0]
        assert c.shape == ref.shape, (key, i)
        err = float(np.abs(c.numpy() - ref).max())
        assert err <= tol, f"{key} chunk {i}: {err:.3g}"


# Ops after which the host has a device value in hand: on a GPU each one stalls the host until
# the device has drained its queue (a scalar read back, or an output shape that depends on data).
HOST_WAITS = frozenset(
    {"aten.item", "aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero",
     "aten.masked_select", "aten.unique_consecutive", "aten._unique2", "aten.index[bool]"}
)  # fmt: skip


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it by name (``aten.index[bool]``: indexing by a mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name = "aten.index[bool]"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def host_waits(self) -> dict[str, int]:
        return {k: n for k, n in self.ops.items() if k in HOST_WAITS}
