"""The data stage's hand-off: what a prepared-data directory holds, as `manifest.json` says.

Two writers: `prepare` (pretraining windows, prepare.py) and `prepare_sft` (instruction windows
with a loss mask, sft.py). Each writes its own set of keys, in a fixed order; `to_json` writes
exactly those, so the file on disk keeps its format (reuse of prepared data checks for it, and
runs log it as an artifact). Every later stage reads a `Manifest` through its attributes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"

# The keys each writer puts in manifest.json, in the order they appear there.
PREPARE_KEYS = (
    "seq_len",
    "streaming",
    "vocab_size",
    "eos_id",
    "tokenizer",
    "files",
    "splits",
    "sources",
    "unigram_baseline",
    "reference",
    "stage_seconds",
    "seconds",
    "config",
    "inputs_fingerprint",
)
SFT_KEYS = ("kind", "path", "seq_len", "vocab_size", "streaming", "splits", "sources", "fingerprint")
PREPARE_SPLIT_KEYS = ("windows", "tokens", "tail_tokens_dropped", "content_hash")
SFT_SPLIT_KEYS = ("examples", "windows", "tokens", "trained_tokens", "fill")


@dataclass
class SplitStats:
    """One split's windows (train, val, and for prepare also test)."""

    windows: int  # packed windows of seq_len + 1 tokens
    tokens: int  # tokens in those windows (for SFT: not counting padding)
    tail_tokens_dropped: int | None = None  # prepare: tokens of a stream's last, partial window
    content_hash: str | None = None  # prepare: packing.WindowHash of the windows in shard order
    examples: int | None = None  # SFT: examples packed into the windows
    trained_tokens: int | None = None  # SFT: tokens the loss counts (loss_mask 1)
    fill: float | None = None  # SFT: share of window positions holding an example's token

    @property
    def keys(self) -> tuple[str, ...]:
        return SFT_SPLIT_KEYS if self.examples is not None else PREPARE_SPLIT_KEYS

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys}

    def metrics(self) -> dict[str, float]:
        """The numbers among the stats (all but content_hash), in file order, to log."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitStats:
        return cls(**{k: d[k] for k in (*SFT_SPLIT_KEYS, *PREPARE_SPLIT_KEYS) if k in d})


@dataclass
class UnigramBaseline:
    """Validation cross-entropy under the train split's token frequencies (no context)."""

    nats_per_token: float
    bits_per_byte: float


@dataclass
class Reference:
    """A known best score for the corpus (the built-in grammar's entropy): no model beats it."""

    name: str
    bits_per_byte: float


@dataclass
class Manifest:
    """A prepared-data directory's manifest.json, plus where that directory is.

    Set by prepare.py (kind None) or sft.py (kind "sft"); fields only one of them writes are
    None for the other's."""

    path: str  # the prepared-data directory; sft.py writes it into the file, prepare adds it on read
    seq_len: int  # window length in tokens (a window stores seq_len + 1: inputs and targets)
    vocab_size: int  # the tokenizer's vocabulary; the model needs at least this many embeddings
    splits: dict[str, SplitStats]  # split name -> its windows
    sources: dict[str, dict]  # source name -> prepare: its data-report entry; SFT: its row counts
    streaming: bool = False  # prepare: train windows are packed while training, not stored
    kind: str | None = None  # "sft" for instruction windows (sft.py); None for prepare's
    tokenizer: str = "tokenizer.json"  # the tokenizer file, relative to `path`
    eos_id: int | None = None  # prepare: the end-of-document token
    files: int | None = None  # prepare: input files read
    unigram_baseline: UnigramBaseline | None = None  # prepare
    reference: Reference | None = None  # prepare, for the built-in grammar corpus only
    stage_seconds: dict[str, float] = field(default_factory=dict)  # prepare: seconds per stage
    seconds: float | None = None  # prepare: the whole pipeline's seconds
    config: dict | None = None  # prepare: the data and tokenizer sections, as JSON
    inputs_fingerprint: str | None = None  # prepare: hash of the input files' names, sizes, mtimes
    fingerprint: str | None = None  # SFT: the directory's name, a hash of the section and inputs

    def to_dict(self) -> dict[str, Any]:
        """What manifest.json holds: the writer's keys, in its order (prepare's has no path)."""
        out = {}
        for key in SFT_KEYS if self.kind == "sft" else PREPARE_KEYS:
            value = getattr(self, key)
            if key == "splits":
                value = {name: s.to_dict() for name, s in value.items()}
            elif key in ("unigram_baseline", "reference") and value is not None:
                value = asdict(value)
            out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None = None) -> Manifest:
        """A manifest from its JSON form; `path` (the directory it was read from) wins over
        the file's own. Keys this class does not know are ignored."""
        known = {k: d[k] for k in (*PREPARE_KEYS, *SFT_KEYS) if k in d}
        known["path"] = str(path) if path is not None else d["path"]
        known["splits"] = {name: SplitStats.from_dict(s) for name, s in d["splits"].items()}
        if known.get("unigram_baseline") is not None:
            known["unigram_baseline"] = UnigramBaseline(**known["unigram_baseline"])
        if known.get("reference") is not None:
            known["reference"] = Reference(**known["reference"])
        return cls(**known)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """The manifest of a prepared-data directory."""
        return cls.from_dict(json.loads((Path(directory) / MANIFEST_FILE).read_text()), path=str(directory))
