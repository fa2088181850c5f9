"""Tolerant reader of the released CosyVoice HyperPyYAML files.

The released model dirs describe their modules with HyperPyYAML tags (``!new:cls``, ``!name:fn``,
``!apply:fn``, ``!ref <key>``, ...). We never import or instantiate upstream classes: every tagged
node becomes a plain dict so that the sizes can be read out of it.

Representation of tagged nodes (what :func:`read_yaml` returns):

* ``!new:pkg.Cls`` / ``!name:pkg.fn`` / ``!apply:pkg.fn`` / any other ``!tag:target`` on a mapping:
  ``{"_tag_": "new", "_target_": "pkg.Cls", **kwargs}``.
* The same tags on a sequence or scalar: ``{"_tag_": ..., "_target_": ..., "_args_": [...]}``.
* ``!ref <key>`` is resolved to the referenced value (same object); ``!ref <a> * <b>`` (an
  arithmetic expression of references) is evaluated to a number.
* ``!include`` / unknown tags without a target become ``{"_tag_": tag, "_args_": ...}``.

Keys starting with ``__`` (the ``__set_seed`` entries) are kept as tagged dicts and never run.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Family = Literal["v1", "v2", "v3"]

# yaml file name -> family; upstream's AutoModel picks the class from the file name as well.
YAML_NAMES: dict[str, Family] = {
    "cosyvoice.yaml": "v1",
    "cosyvoice2.yaml": "v2",
    "cosyvoice3.yaml": "v3",
}


class ConfigError(ValueError):
    """The yaml is missing, unreadable or lacks a value we need."""


class _Ref:
    """Placeholder for an unresolved ``!ref`` expression."""

    __slots__ = ("expr",)

    def __init__(self, expr: str) -> None:
        self.expr = expr


class _Loader(yaml.SafeLoader):
    """SafeLoader plus tolerant constructors for every HyperPyYAML tag."""


def _construct_ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


def _construct_tagged(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
    # The multi constructor gets e.g. suffix "new:cosyvoice.llm.llm.Qwen2LM" for tag "!new:...".
    kind, _, target = suffix.partition(":")
    out: dict[str, Any] = {"_tag_": kind, "_target_": target}
    if isinstance(node, yaml.MappingNode):
        out.update(loader.construct_mapping(node, deep=True))
    elif isinstance(node, yaml.SequenceNode):
        out["_args_"] = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
        out["_args_"] = [] if value == "" else [value]
    return out


_Loader.add_constructor("!ref", _construct_ref)
_Loader.add_multi_constructor("!", _construct_tagged)

# HyperPyYAML (via ruamel) reads "1e-06" or "1e-5" as floats; PyYAML's YAML 1.1 resolver does not
# (it wants a dot). Add a resolver so such values come out as floats, as upstream sees them.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_REF_RE = re.compile(r"<([^<>]+)>")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _safe_eval(expr: str) -> Any:
    """Evaluate an arithmetic expression of literals (no names, no calls)."""

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int | float):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ConfigError(f"unsupported !ref expression: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _lookup(root: dict[str, Any], key: str) -> Any:
    # "<a>" or "<a[b][c]>" style paths; HyperPyYAML also allows "<a.b>".
    parts = [p for p in re.split(r"[.\[\]]", key.strip()) if p]
    cur: Any = root
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit():
            cur = cur[int(p)]
        else:
            raise ConfigError(f"!ref <{key}>: not found")
    return cur


def _resolve(node: Any, root: dict[str, Any], depth: int = 0) -> Any:
    if depth > 50:
        raise ConfigError("!ref nesting too deep (cycle?)")
    if isinstance(node, _Ref):
        refs = _REF_RE.findall(node.expr)
        if _REF_RE.fullmatch(node.expr.strip()):
            return _resolve(_lookup(root, refs[0]), root, depth + 1)
        values = {r: _resolve(_lookup(root, r), root, depth + 1) for r in refs}
        text = _REF_RE.sub(lambda m: repr(values[m.group(1)]), node.expr)
        try:
            return _safe_eval(text)
        except (ConfigError, SyntaxError):
            return text  # string interpolation, e.g. a path "<dir>/file"
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _resolve(node[k], root, depth)
        return node
    if isinstance(node, list):
        for i, v in enumerate(node):
            node[i] = _resolve(v, root, depth)
        return node
    return node


def read_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse a CosyVoice HyperPyYAML file into plain Python data (see module docstring).

    ``overrides`` replace top-level keys before references are resolved (upstream passes
    ``qwen_pretrain_path`` this way).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - our loader is SafeLoader-based
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid yaml: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is not a mapping")
    if overrides:
        data.update(overrides)
    return _resolve(data, data)


def detect_family(model_dir: str | Path) -> tuple[Family, Path]:
    """Return (family, yaml path) of a model dir, by the yaml file name as upstream does.

    If several yaml files are present the newest family wins (upstream tries v3, v2, v1 in
    that order as well).
    """
    model_dir = Path(model_dir)
    for name in ("cosyvoice3.yaml", "cosyvoice2.yaml", "cosyvoice.yaml"):
        p = model_dir / name
        if p.is_file():
            return YAML_NAMES[name], p
    raise ConfigError(f"{model_dir}: no cosyvoice.yaml / cosyvoice2.yaml / cosyvoice3.yaml found")


def load_model_yaml(model_dir: str | Path) -> tuple[Family, dict[str, Any]]:
    """Detect the family of ``model_dir`` and read its yaml with upstream's override of
    ``qwen_pretrain_path`` (v2/v3) applied."""
    model_dir = Path(model_dir)
    family, path = detect_family(model_dir)
    overrides = None
    if family in ("v2", "v3"):
        overrides = {"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")}
    return family, read_yaml(path, overrides)


def _get(d: dict[str, Any], *keys: str, default: Any = ...) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            if default is not ...:
                return default
            raise ConfigError(f"yaml lacks {'.'.join(keys)}")
        cur = cur[k]
    return cur


# --------------------------------------------------------------------------------------------
# LLM configs (the flow/hift configs live in cosyvoice.flow / cosyvoice.hift)


@dataclass(frozen=True)
class SamplingConfig:
    """Repetition-aware sampling parameters (``llm.sampling`` in the yaml)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass(frozen=True)
class QwenConfig:
    """The compute-relevant part of ``CosyVoice-BlankEN/config.json``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        import json

        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            rope_theta=float(d.get("rope_theta", 1e6)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        )


@dataclass(frozen=True)
class LLMConfig:
    """Sizes of the text-to-speech-token LM (v2 ``Qwen2LM`` / v3 ``CosyVoice3LM``)."""

    family: Family
    llm_input_size: int
    llm_output_size: int
    speech_token_size: int
    mix_ratio: tuple[int, int] = (5, 15)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    qwen: QwenConfig | None = None
    # v1 TransformerLM-only sizes (None for v2/v3)
    text_token_size: int | None = None
    spk_embed_dim: int = 192
    text_encoder_input_size: int | None = None
    v1_text_encoder: dict[str, Any] | None = None
    v1_llm: dict[str, Any] | None = None


def llm_config(family: Family, cfg: dict[str, Any], model_dir: str | Path) -> LLMConfig:
    """Build :class:`LLMConfig` from a parsed yaml (``read_yaml``) and the model dir."""
    llm = _get(cfg, "llm")
    s = _get(llm, "sampling", default={}) or {}
    sampling = SamplingConfig(
        top_p=float(s.get("top_p", 0.8)),
        top_k=int(s.get("top_k", 25)),
        win_size=int(s.get("win_size", 10)),
        tau_r=float(s.get("tau_r", 0.1)),
    )
    qwen = None
    if family in ("v2", "v3"):
        qwen = QwenConfig.from_json(Path(model_dir) / "CosyVoice-BlankEN" / "config.json")
    mix = tuple(_get(llm, "mix_ratio", default=[5, 15]))
    return LLMConfig(
        family=family,
        llm_input_size=int(_get(llm, "llm_input_size")),
        llm_output_size=int(_get(llm, "llm_output_size")),
        speech_token_size=int(_get(llm, "speech_token_size")),
        mix_ratio=(int(mix[0]), int(mix[1])),
        sampling=sampling,
        qwen=qwen,
        text_token_size=_get(llm, "text_token_size", default=None),
        spk_embed_dim=int(_get(llm, "spk_embed_dim", default=cfg.get("spk_embed_dim", 192))),
        text_encoder_input_size=_get(llm, "text_encoder_input_size", default=None),
        v1_text_encoder=_get(llm, "text_encoder", default=None),
        v1_llm=_get(llm, "llm", default=None) if family == "v1" else None,
    )
