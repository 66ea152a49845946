"""The spec's `source:`: a tiny random model or a checkpoint path, its cache key, and loading it as a ModelIR."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from .cache import memo_digests
from .errors import UserError

MAX_TINY_PARAMS = 1 << 28      # 1 GiB of float32: above this a "tiny" model is a typo that would exhaust memory


def expand_home(text: str) -> Path:
    """Path(text) with a leading ~ or ~user expanded; a user without a home is a UserError (pathlib raises
    RuntimeError)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserError(f"{text}: no home directory for {text.split('/')[0]}") from None


def resolve_local_path(text: str, info: ValidationInfo) -> str:
    """A path from the spec, made absolute: relative to the current directory, else to the spec's directory
    (validation context `spec_dir`). ValueError when it exists in neither."""
    try:
        p = expand_home(text)
    except UserError as e:
        raise ValueError(str(e)) from None
    base = (info.context or {}).get("spec_dir")
    for cand in [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(base) / p] if base else []):
        try:
            found = cand.exists()
        except OSError as e:        # a name longer than the filesystem allows, say
            raise ValueError(f"not a usable path ({e.strerror}): {text}") from None
        if found:
            return str(cand.resolve())
    raise ValueError(f"file not found: {text}")


class TinySource(BaseModel):
    """Keyword arguments of `tscompile.tiny.make_tiny_ir`."""
    model_config = ConfigDict(extra="forbid")
    family: Literal["llama", "mistral", "qwen2", "mixtral"] = "mistral"
    activation: Literal["swiglu", "geglu", "relu", "drelu"] = "swiglu"
    seed: int = Field(0, ge=0, lt=2**63)
    layers: int = Field(2, gt=0, le=64)
    hidden: int = Field(64, gt=0, le=8192)
    intermediate: int = Field(192, gt=0, le=32768)
    heads: PositiveInt = 4
    kv_heads: PositiveInt = 2
    vocab: int = Field(384, ge=260, le=262144)   # 256 byte tokens + <unk>, <s>, </s> + at least one merge
    experts: int = Field(0, ge=0, le=64)
    top_k: PositiveInt = 2
    sliding_window: PositiveInt | None = None

    @field_validator("heads")
    @classmethod
    def _heads_divide_hidden(cls, v, info):
        hidden = info.data.get("hidden")
        if hidden and (hidden % v or (hidden // v) % 2):
            raise ValueError(f"must divide hidden ({hidden}) into an even head size")
        return v

    @field_validator("kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, v, info):
        heads = info.data.get("heads")
        if heads and heads % v:
            raise ValueError(f"must divide heads ({heads})")
        return v

    @model_validator(mode="after")
    def _moe_needs_experts(self):
        if self.family == "mixtral" and not (self.experts >= self.top_k):
            raise ValueError(f"mixtral needs experts >= top_k ({self.top_k}), got experts={self.experts}")
        if self.family != "mixtral" and self.experts:
            raise ValueError(f"experts is only for family mixtral, not {self.family}")
        return self

    @model_validator(mode="after")
    def _small_enough(self):
        # an upper bound: untied embeddings, k/v as wide as q
        n = 2 * self.vocab * self.hidden + self.layers * (
            4 * self.hidden ** 2 + max(self.experts, 1) * 3 * self.hidden * self.intermediate)
        if n > MAX_TINY_PARAMS:
            raise ValueError(f"a tiny model of about {n / 1e6:.0f}M parameters is not tiny "
                             f"(at most {MAX_TINY_PARAMS / 1e6:.0f}M: lower layers, hidden, intermediate or vocab)")
        return self


class SourceSpec(BaseModel):
    """Exactly one of `path` (HF dir, .gguf file, pypi:PACKAGE[==VERSION]) and `tiny`."""
    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    tiny: TinySource | None = None

    @field_validator("path")
    @classmethod
    def _a_model_is_there(cls, v: str | None, info: ValidationInfo) -> str | None:
        """pypi:NAME[==VERSION], a dir with a config.json, or a GGUF file; a build dir is named as such."""
        if v is None:
            return v
        from .importers import local_source_kind, pinned_requirement
        try:
            if v.startswith("pypi:"):
                pinned_requirement(v[5:])
                return v
            path = Path(resolve_local_path(v, info))
            local_source_kind(path, v)   # the importer's own test of what it can read
        except UserError as e:
            raise ValueError(str(e)) from None
        return str(path)

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'path' or 'tiny'")
        return self


def describe_source(src: SourceSpec) -> str:
    if src.tiny is not None:
        t = src.tiny
        return f"tiny {t.family}/{t.activation} ({t.layers} layers, hidden {t.hidden}, seed {t.seed})"
    return src.path


def source_key(src: SourceSpec, memo_file: Path | None = None, write_memo: bool = True) -> str:
    """Content key of the source: the tiny config; else the importer's version and the bytes of a local file/dir,
    or the pypi requirement with the version the importer pins for it."""
    from .importers import IMPORTER_VERSION, pinned_requirement
    h = hashlib.sha256()
    if src.tiny is not None:
        h.update(b"tiny\0" + json.dumps(src.tiny.model_dump(), sort_keys=True).encode())
    elif src.path.startswith("pypi:"):
        h.update(f"pypi\0{IMPORTER_VERSION}\0{pinned_requirement(src.path[5:])}".encode())
    else:
        h.update(f"path\0{IMPORTER_VERSION}\0{tree_hash(Path(src.path), memo_file, write_memo)}".encode())
    return h.hexdigest()


def tree_hash(root: Path, memo_file: Path | None, write_memo: bool) -> str:
    """sha256 over relative names and bytes of every file under root; memoized by (path, size, mtime)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p, digest in zip(files, memo_digests(files, memo_file, write_memo)):
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{digest}\0".encode())
    return h.hexdigest()


def worth_caching(src: SourceSpec) -> bool:
    """Whether a build should keep its own copy of the loaded source: not for a checkpoint dir (already a
    checkpoint on disk) nor for pypi: (the importer caches its conversion); yes for tiny models and files."""
    return src.tiny is not None or (not src.path.startswith("pypi:") and Path(src.path).is_file())


def load_source(src: SourceSpec):
    """The source model as a ModelIR."""
    if src.tiny is not None:
        from .tiny import make_tiny_ir
        return make_tiny_ir(**src.tiny.model_dump())
    from .importers import import_source
    return import_source(src.path)
