"""Speaker store: built-in ``spk2info.pt`` speakers plus registered zero-shot speakers.

Registered speakers are computed from prompt audio + transcript (spec §3: CAM++ embedding,
S3 speech tokens, 24 kHz prompt mel, 1:2 token/mel alignment) and persisted one file per
speaker as safetensors in ``speaker_dir`` (atomic write: temp file + rename), so they
survive a restart. Built-in speakers are read-only.

Several processes may share one ``speaker_dir`` (the replicas of a deployment, on one machine
or on a network file system): each query first looks whether the directory changed and reads
what another process registered, replaced or deleted, so a speaker registered through one
process is usable on all and a deletion is seen everywhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .frontend.audio import (
    AudioError,
    AudioSource,
    decode_audio,
    kaldi_fbank_cmn,
    matcha_mel,
    resample,
    whisper_log_mel,
)

MIN_PROMPT_SECONDS = 1.0
MAX_PROMPT_SECONDS = 30.0  # the speech tokenizer refuses longer audio
MIN_SAMPLE_RATE = 16000  # upstream asserts the prompt rate is >= 16 kHz
SILENCE_PEAK = 1e-3  # peak amplitude below which the prompt counts as silent
MAX_PEAK = 16.0  # float samples past full scale by more than this (24 dB) are not a recording
_NAME_RE = re.compile(r"^[^/\\]{1,64}$")
# Characters a name may not hold: controls, invisible formatting (zero-width, bidirectional
# overrides) and line or paragraph separators, which make two names look alike or break a
# log line.
_HIDDEN = ("Cc", "Cf", "Zl", "Zp")


def _name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a speaker name (None: nothing). A name must fit in a URL
    path segment and read as what it is: "." and ".." would be normalized away by clients, so
    such a speaker could not be deleted; a name not in Unicode's composed form (NFC) could sit
    beside the composed one and look the same."""
    if not _NAME_RE.match(name):
        return "a name is 1 to 64 characters, without / or \\"
    if not unicodedata.is_normalized("NFC", name):
        return "it is not in Unicode's composed form (NFC)"
    if name in (".", ".."):
        return "it is . or .., which clients take for a path"
    if name.strip() != name:
        return "it starts or ends with white space"
    if any(unicodedata.category(c) in _HIDDEN for c in name):
        return "it holds control or invisible characters"
    return None


class SpeakerError(KeyError):
    """Unknown speaker, name clash, or deleting a built-in speaker."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StoreNotWritable(PermissionError):
    """``speaker_dir`` cannot take a registration (read-only, or not a folder we may write)."""


@dataclass
class Speaker:
    """What the LLM and the flow need from a speaker.

    ``embedding`` (1, 192) float32 is the CAM++ x-vector (flow speaker embedding; v1 LLM too).
    Zero-shot speakers also carry ``prompt_text_ids``, ``prompt_speech_tokens`` (aligned, also
    fed to the LLM unless ``llm_prompt_speech`` is off) and ``prompt_feat`` (1, 2*Ts, 80). SFT
    speakers have empty prompts. Upstream's cross-lingual and instruct modes are speakers whose
    prompt speech only the flow hears (:meth:`SpeakerStore.from_prompt` without a transcript,
    ``Model.instructed``).
    """

    name: str
    embedding: torch.Tensor
    prompt_text_ids: list[int] = field(default_factory=list)
    prompt_speech_tokens: list[int] = field(default_factory=list)
    prompt_feat: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 0, 80))
    prompt_text: str = ""
    builtin: bool = False
    llm_prompt_speech: bool = True
    llm_embedding: bool = True  # the v1 LLM hears the x-vector (not in 300M-Instruct's mode)
    steering: Steering | None = field(default=None, compare=False, repr=False)

    @property
    def zero_shot(self) -> bool:
        return bool(self.prompt_speech_tokens)

    def same_flow_prompt(self, other: Speaker) -> bool:
        """Whether the flow hears the same prompt from both (two names for one recording, the
        transcripts aside): the flow keeps a prompt's state by its content, once for both."""
        return (
            self.prompt_speech_tokens == other.prompt_speech_tokens
            and torch.equal(self.prompt_feat, other.prompt_feat)
            and torch.equal(self.embedding, other.embedding)
        )


@dataclass(frozen=True)
class Steering:
    """How a named speaker's voice was steered (``Model.instructed`` of a name). An utterance
    looks the name up again when it starts, to speak as the name alone would then: deleted
    meanwhile is a ``SpeakerError``, registered anew is steered again from its new recording."""

    name: str
    instruction: str
    source: Speaker  # the store's voice for the name when it was steered


class PromptExtractor:
    """Prompt-audio features with the model dir's ONNX models (CPU onnxruntime)."""

    def __init__(self, model_dir: Path, family: str, cfg: dict[str, Any]) -> None:
        self.model_dir = model_dir
        self.family = family
        self.sample_rate = int(cfg.get("sample_rate", 24000))
        fe = cfg.get("feat_extractor") or {}
        self.mel_args = {
            k: fe.get(k, d)
            for k, d in dict(
                n_fft=1920,
                num_mels=80,
                sampling_rate=self.sample_rate,
                hop_size=480,
                win_size=1920,
                fmin=0,
                fmax=8000,
                center=False,
            ).items()
        }
        self.tokenizer_file = {
            "v1": "speech_tokenizer_v1.onnx",
            "v2": "speech_tokenizer_v2.onnx",
            "v3": "speech_tokenizer_v3.onnx",
        }[family]
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, name: str):
        with self._lock:
            if name not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                self._sessions[name] = ort.InferenceSession(
                    str(self.model_dir / name),
                    sess_options=opts,
                    providers=["CPUExecutionProvider"],
                )
            return self._sessions[name]

    def embedding(self, wav16k: torch.Tensor) -> torch.Tensor:
        feat = kaldi_fbank_cmn(wav16k)
        sess = self._session("campplus.onnx")
        out = sess.run(None, {sess.get_inputs()[0].name: feat.unsqueeze(0).numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def speech_tokens(self, wav16k: torch.Tensor) -> list[int]:
        if wav16k.shape[1] / 16000 > MAX_PROMPT_SECONDS:
            raise AudioError(f"prompt audio longer than {MAX_PROMPT_SECONDS:g} s")
        feat = whisper_log_mel(wav16k, n_mels=128)
        sess = self._session(self.tokenizer_file)
        ins = sess.get_inputs()
        out = sess.run(
            None,
            {ins[0].name: feat.numpy(), ins[1].name: np.array([feat.shape[2]], dtype=np.int32)},
        )[0]
        return np.asarray(out).reshape(-1).astype(np.int64).tolist()

    def prompt_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(1, N) at the model's sample rate -> (1, T, 80)."""
        return matcha_mel(wav, **self.mel_args).squeeze(0).transpose(0, 1).unsqueeze(0)

    def extract(self, wav: np.ndarray, sr: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """(embedding, aligned speech tokens, aligned prompt mel) from a mono waveform."""
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).unsqueeze(0)
        w16 = resample(x, sr, 16000)
        emb = self.embedding(w16)
        tokens = self.speech_tokens(w16)
        feat = self.prompt_mel(resample(x, sr, self.sample_rate))
        if self.family in ("v2", "v3"):
            n = min(feat.shape[1] // 2, len(tokens))
            feat, tokens = feat[:, : 2 * n], tokens[:n]
        return emb, tokens, feat


def check_prompt_audio(wav: np.ndarray, sr: int) -> None:
    """Raise :class:`AudioError` for audio that cannot make a usable prompt."""
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(f"sample rate {sr} Hz is below {MIN_SAMPLE_RATE} Hz")
    dur = len(wav) / sr
    if dur < MIN_PROMPT_SECONDS:
        # (to the millisecond, rounded down: 0.9995 s read "1.00 s < 1 s")
        raise AudioError(f"prompt audio too short: {math.floor(dur * 1000) / 1000:g} s < "
                         f"{MIN_PROMPT_SECONDS:g} s")  # fmt: skip
    if dur > MAX_PROMPT_SECONDS:
        raise AudioError(f"prompt audio too long: {math.ceil(dur * 1000) / 1000:g} s > "
                         f"{MAX_PROMPT_SECONDS:g} s")  # fmt: skip
    if not np.isfinite(wav).all():
        raise AudioError("prompt audio contains NaN/inf samples")
    peak = float(np.abs(wav).max())
    if peak > MAX_PEAK:  # float audio whose features would overflow
        raise AudioError("prompt audio samples out of range: float audio lies within [-1, 1]")
    if peak < SILENCE_PEAK:
        raise AudioError("prompt audio is silent")


class SpeakerStore:
    """``list()``, ``get(name)``, ``register(name, audio, prompt_text)``, ``delete(name)``."""

    def __init__(
        self,
        model_dir: str | Path,
        family: str,
        cfg: dict[str, Any],
        encode_text: Callable[[str], list[int]],
        speaker_dir: str | Path | None = None,
        normalize_text: Callable[[str], str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.family = family
        self.encode_text = encode_text
        self.normalize_text = normalize_text
        self.speaker_dir = (
            Path(speaker_dir) if speaker_dir else self.model_dir / "registered_speakers"
        )
        self.extractor = PromptExtractor(self.model_dir, family, cfg)
        self._lock = threading.RLock()
        self._builtin = self._load_spk2info()
        self._registered: dict[str, Speaker] = {}
        # Each speaker file as last read: its identity (inode, mtime, size) and the speaker
        # (None: unreadable). A file whose identity changed was replaced by another process.
        self._files: dict[str, tuple[tuple[int, int, int], Speaker | None]] = {}
        # speaker_dir's (inode, mtime) at the last scan; racy: that mtime may hide a change
        self._dir_stamp: tuple[int, int] | None = None
        self._stamp_racy = True
        self._remove_leftovers()
        self._refresh()

    # -- loading ------------------------------------------------------------------------------
    def _load_spk2info(self) -> dict[str, Speaker]:
        path = self.model_dir / "spk2info.pt"
        if not path.is_file():
            return {}
        raw = torch.load(path, map_location="cpu", weights_only=True)
        out = {}
        for name, e in raw.items():
            if "embedding" in e:  # SFT format
                emb = e["embedding"]
                out[name] = Speaker(name, emb.float().reshape(1, -1), builtin=True)
            elif "llm_prompt_speech_token" in e:  # add_zero_shot_spk format
                out[name] = Speaker(
                    name,
                    e["flow_embedding"].float().reshape(1, -1),
                    prompt_text_ids=e["prompt_text"].reshape(-1).tolist(),
                    prompt_speech_tokens=e["llm_prompt_speech_token"].reshape(-1).tolist(),
                    prompt_feat=e["prompt_speech_feat"].float().reshape(1, -1, 80),
                    builtin=True,
                )
        return out

    def _file(self, name: str) -> Path:
        # hashed file names: any Unicode speaker name, no path tricks
        return self.speaker_dir / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".safetensors")

    def _remove_leftovers(self) -> None:
        """A write interrupted by a crash leaves a temp file: never a speaker, so remove it;
        but not one another process is writing now (it holds a lock on it)."""
        if not self.speaker_dir.is_dir():
            return
        for tmp in self.speaker_dir.glob(f"{_TMP_PREFIX}*"):
            try:
                fd = os.open(tmp, os.O_RDWR)
            except FileNotFoundError:  # renamed into place meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink(missing_ok=True)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)

    def _refresh(self) -> None:
        """Catch up with what other processes wrote to or deleted from ``speaker_dir``. One
        ``stat`` while the directory is unchanged; else a rescan that reads only new or replaced
        files. Called with the lock held."""
        try:
            st = self.speaker_dir.stat()
            stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
            if stamp == self._dir_stamp and not self._stamp_racy:
                return
            paths = list(self.speaker_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):  # none registered yet (or removed),
            # or a path that cannot become a folder (unwritable(): registrations are refused)
            stamp, paths = None, []
        files: dict[str, tuple[tuple[int, int, int], Speaker | None]] = {}
        for p in paths:
            if not _SPEAKER_FILE.fullmatch(p.name):  # only files this store wrote
                continue
            try:
                fst = p.stat()
            except FileNotFoundError:  # deleted while we looked
                continue
            key = (fst.st_ino, fst.st_mtime_ns, fst.st_size)
            known = self._files.get(p.name)
            if known is not None and known[0] == key:
                files[p.name] = known
                continue
            try:
                spk: Speaker | None = _read_speaker(p)
            except Exception:  # a damaged file must not take the server down
                spk = None
            files[p.name] = (key, spk)
        self._files = files
        found = sorted((spk for _, spk in files.values() if spk), key=lambda s: s.name)
        self._registered = {spk.name: spk for spk in found}
        self._dir_stamp = stamp
        # A directory's mtime has its file system's granularity (a clock tick; a second on some
        # network file systems): a change in the same tick as this scan would leave it as is.
        self._stamp_racy = stamp is not None and time.time_ns() - stamp[1] < _RACY_NS

    def unwritable(self) -> str | None:
        """Why a registration could not be saved in ``speaker_dir`` now (None: it could). The
        folder is made at the first registration, so its nearest existing parent is asked."""
        d = self.speaker_dir.absolute()
        try:
            while not d.exists() and d != d.parent:
                d = d.parent
            if not d.is_dir():
                return f"{d} is not a folder"
            if os.statvfs(d).f_flag & os.ST_RDONLY:
                return f"{d} is on a read-only file system"
        except OSError as exc:  # a parent that may not be searched, an odd file system
            return f"{d}: {exc.strerror or exc}"
        if not os.access(d, os.W_OK | os.X_OK):
            return f"{d} is not writable by this process"
        return None

    # -- queries ------------------------------------------------------------------------------
    def list(self) -> list[str]:
        with self._lock:
            self._refresh()
            return [*self._builtin, *(n for n in self._registered if n not in self._builtin)]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            self._refresh()
            return name in self._builtin or name in self._registered

    def get(self, name: str) -> Speaker:
        with self._lock:
            self._refresh()
            if name in self._builtin:
                return self._builtin[name]
            if name in self._registered:
                return self._registered[name]
        raise SpeakerError(f"unknown speaker: {name!r}")

    # -- mutations ----------------------------------------------------------------------------
    def register(
        self,
        name: str,
        audio: AudioSource,
        prompt_text: str,
        overwrite: bool = False,
        normalize: bool = True,
    ) -> Speaker:
        """Build a zero-shot speaker from prompt audio (any format PyAV decodes) and its
        transcript (:meth:`from_prompt`), persist it, return it. Raises :class:`AudioError` for
        unusable audio and :class:`SpeakerError` for a bad or taken name."""
        if why := _name_problem(name):  # (a bounded prefix: a 500 KB name made a 500 KB error)
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise SpeakerError(f"invalid speaker name {shown!r}: {why}")
        if why := self.unwritable():  # before the upload is analysed, which takes seconds
            raise StoreNotWritable(f"speakers cannot be saved: {why}")
        with self._lock:
            self._refresh()
            if name in self._builtin:
                raise SpeakerError(f"{name!r} is a built-in speaker")
            if name in self._registered and not overwrite:
                raise SpeakerError(f"speaker {name!r} already exists")
        spk = self.from_prompt(audio, prompt_text, name, normalize)
        # Written and synced outside the lock, which a server's lookups take on its event loop:
        # the file system, not the lock, decides between two registrations of one name.
        self.speaker_dir.mkdir(parents=True, exist_ok=True)
        path = self._file(name)
        key = _write_speaker(path, spk, self.family, replace=overwrite)
        if key is None:
            raise SpeakerError(f"speaker {name!r} already exists")  # another's, just now
        with self._lock:
            known = self._files.get(path.name)
            if known is not None and known[0] == key and known[1] is not None:
                spk = known[1]  # a lookup read the file already: one object per file
            self._files[path.name] = (key, spk)
            self._registered[name] = spk
            # What the file became meanwhile (deleted, or replaced by another writer) shows
            # on the next lookup's rescan.
            self._stamp_racy = True
        return spk

    def from_prompt(
        self,
        audio: AudioSource,
        prompt_text: str | None,
        name: str = "zero-shot",
        normalize: bool = True,
    ) -> Speaker:
        """A zero-shot speaker from prompt audio and its transcript, neither kept nor listed
        (upstream's ``inference_zero_shot``; :meth:`register` keeps one). Without a transcript
        (None) the LLM hears no prompt and only the flow does (upstream's cross-lingual mode,
        the base of its instruct2). Raises :class:`AudioError` for unusable audio, ValueError
        for an empty transcript.

        ``normalize``: run the transcript through the text normaliser first, as upstream's
        ``inference_zero_shot`` does for a prompt wav (its ``add_zero_shot_spk`` does not)."""
        if prompt_text is not None and not prompt_text.strip():
            raise ValueError("prompt_text is empty")
        text = prompt_text or ""
        if text and normalize and self.normalize_text is not None:
            text = self.normalize_text(text)
        wav, sr = decode_audio(audio, MAX_PROMPT_SECONDS + 1.0, MIN_SAMPLE_RATE)
        check_prompt_audio(wav, sr)
        emb, tokens, feat = self.extractor.extract(wav, sr)
        if not tokens:
            raise AudioError("prompt audio gave no speech tokens")
        if not (torch.isfinite(emb).all() and torch.isfinite(feat).all()):
            raise AudioError("prompt audio gave features that are not finite numbers")
        return Speaker(
            name,
            emb,
            prompt_text_ids=list(self.encode_text(text)) if text else [],
            prompt_speech_tokens=tokens,
            prompt_feat=feat,
            prompt_text=prompt_text or "",
            llm_prompt_speech=prompt_text is not None,
        )

    def delete(self, name: str) -> None:
        with self._lock:
            self._refresh()
            if name in self._builtin:
                raise SpeakerError(f"{name!r} is a built-in speaker and cannot be deleted")
            if name not in self._registered:
                raise SpeakerError(f"unknown speaker: {name!r}")
            path = self._file(name)
            path.unlink(missing_ok=True)
            self._files.pop(path.name, None)
            del self._registered[name]
        _fsync_dir(self.speaker_dir)  # the deletion survives a crash (out of the lock, as above)


_TMP_PREFIX = ".tmp-"
_RACY_NS = 2_000_000_000  # see SpeakerStore._refresh
_SPEAKER_FILE = re.compile(r"[0-9a-f]{24}\.safetensors")  # see SpeakerStore._file


def _write_speaker(
    path: Path, spk: Speaker, family: str, replace: bool
) -> tuple[int, int, int] | None:
    """Write atomically and durably; returns the file's key (inode, mtime, size: what
    :meth:`SpeakerStore._refresh` compares), taken from the file written, not from ``path``,
    which another writer may have replaced since. Without ``replace``, None if ``path``
    exists already (checked by the file system, so two processes registering one name
    cannot both win)."""
    tensors = {
        "embedding": spk.embedding.float().contiguous(),
        "prompt_text_ids": torch.tensor(spk.prompt_text_ids, dtype=torch.int32),
        "prompt_speech_tokens": torch.tensor(spk.prompt_speech_tokens, dtype=torch.int32),
        "prompt_feat": spk.prompt_feat.float().contiguous(),
    }
    meta = {
        "name": spk.name,
        "prompt_text": spk.prompt_text,
        "family": family,
        "created": str(int(time.time())),
        "format": "cosyvoice-speaker-1",
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=".partial")
    try:
        # Held until the file is in place: another process's start-up cleanup (a replica
        # sharing the directory) leaves a temp file alone while it is locked.
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())  # a link or rename keeps inode, mtime and size
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent, also on NFS
            except FileExistsError:
                return None
            finally:
                Path(tmp).unlink(missing_ok=True)
        _fsync_dir(path.parent)  # the rename itself is durable only once the directory is
        return st.st_ino, st.st_mtime_ns, st.st_size
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_speaker(path: Path) -> Speaker:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    return Speaker(
        meta["name"],
        t["embedding"],
        prompt_text_ids=t["prompt_text_ids"].tolist(),
        prompt_speech_tokens=t["prompt_speech_tokens"].tolist(),
        prompt_feat=t["prompt_feat"],
        prompt_text=meta.get("prompt_text", ""),
    )
