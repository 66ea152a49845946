"""Build cache: chained content keys, pass outputs as sparse checkpoints, and atomic directory publishing.

    build/<name>/.cache/passes/<key>/   a pass's (or the source's) output: sparse checkpoint + entry.json
    build/<name>/.cache/work/<key>/     scratch a running step keeps across runs (resumable training)
    build/<name>/<target>/manifest.json holds the target's cache_key

Nothing is written in place: a directory is filled under a hidden temp name and renamed into place, so a
build killed at any moment leaves either the old complete directory, the new complete one, or none.
Temp names carry the writer's pid and host tag: every new temp sweeps the stale ones beside it (`sweep_stale`),
so what a killed writer left goes the next time anything is written there. Only temps tagged with this host and
PID namespace are swept: a pid says nothing about a writer on another machine or in another container sharing
the directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .errors import UserError

POLICIES = ("on", "off", "redo", "readonly")
ENTRY = "entry.json"
_TEMP_NAME = re.compile(r"\.(?:tmp|old)-(\d+)-(?:([0-9a-f]{8})-)?")   # no tag: named before tags (this host's)


def _host_tag() -> str:
    """8 hex digits naming this machine and PID namespace: the ones whose pids a temp name's pid is."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}|{ns}".encode()).hexdigest()[:8]


_HOST = _host_tag()


def reads(policy: str) -> bool:
    """Whether cached results may be used."""
    return policy in ("on", "readonly")


def writes(policy: str) -> bool:
    """Whether results are stored in the cache."""
    return policy in ("on", "redo")


@cache
def tool_versions() -> dict[str, str]:
    """Versions that change numerics: part of every key. Read from metadata, so nothing heavy is imported."""
    out = {}
    for dist in ("tscompile", "torch", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "none"
    return out


def chain_key(prev: str, *parts: Any) -> str:
    """sha256 of the previous key and this step's identity (JSON-encodable parts)."""
    text = json.dumps([prev, *parts, tool_versions()], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def temp_dir(parent: Path, name: str) -> Path:
    """A fresh hidden directory beside where `name` will be published (same filesystem: rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, deep=False)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=parent))


@contextmanager
def atomic_dir(final: Path):
    """A temp dir beside `final` for the block to fill; published as `final` (`publish_dir`) if the block
    succeeds, removed if not."""
    tmp = temp_dir(final.parent, final.name)
    try:
        yield tmp
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # nothing left there once published


@contextmanager
def scratch_dir(parent: Path, name: str):
    """A temp dir under `parent` (e.g. a download moved out of it into `parent`), removed when the block ends."""
    path = temp_dir(parent, name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_file(path: Path):
    """A temp path beside `path` for the block to write; renamed onto `path` if the block succeeds, removed if
    not. Readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, deep=False)
    tmp = path.parent / (_temp_prefix(path.name) + secrets.token_hex(4))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{os.getpid()}-{_HOST}-"


def ordinary_permissions(path: Path) -> None:
    """The mode open()/mkdir() would give `path` (0666, or 0777 for dirs and executables, less the umask):
    mkstemp, mkdtemp and safetensors make files 0600 and dirs 0700, but published they are ordinary build files."""
    path.chmod((0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666) & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to `final`, replacing what was there; `final` is never half-written. What its
    writers made 0600 or 0700 (mkstemp, mkdtemp, safetensors) is published with ordinary permissions."""
    for p in [tmp, *tmp.rglob("*")]:
        if not p.is_symlink():
            ordinary_permissions(p)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name, "old"), dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks (a multi-GB file never sits in memory)."""
    from tqdm import tqdm
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"hash {path.name}",
                                     disable=True if size < 256 * 1024**2 else None, leave=False) as bar:
        while chunk := f.read(16 * 1024**2):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def memo_digests(files: list[Path], memo_file: Path | None, write_memo: bool) -> list[str]:
    """sha256 of each file, taken from `memo_file` where a file's (path, size, mtime) is recorded there."""
    memo = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            pass
        memo = memo if isinstance(memo, dict) else {}
    stamps = [f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}" for p, st in ((p, p.stat()) for p in files)]
    out = [memo.get(stamp) or sha256_file(p) for p, stamp in zip(files, stamps)]
    paths = {stamp.rsplit("|", 2)[0] for stamp in stamps}       # these files' older stamps go: the memo stays small
    new = {k: v for k, v in memo.items() if k.rsplit("|", 2)[0] not in paths} | dict(zip(stamps, out))
    if memo_file is not None and write_memo and new != memo:
        write_text_atomic(memo_file, json.dumps(new, indent=0))
    return out


def sweep_stale(root: Path, deep: bool = True) -> None:
    """Remove temp files/dirs left under root (in root itself unless deep) by writers that were killed (their
    pid is gone)."""
    if not root.is_dir():
        return
    for p in list(root.rglob(".*") if deep else root.glob(".*")):
        m = _TEMP_NAME.search(p.name)
        if m and m.group(2) in (_HOST, None) and not _alive(int(m.group(1))) and p.exists():
            try:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            except OSError:     # e.g. another user's file in a sticky dir: theirs to sweep
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory by hard links (cache entry -> model/ costs nothing); plain copy across filesystems."""
    for p in src.iterdir():
        if p.is_file():
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copy2(p, dst / p.name)


class PassCache:
    """Pass outputs by key under `root` (build/<name>/.cache/passes)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.path(key) / ENTRY).is_file()

    def load(self, key: str):
        from .ir import ModelIR
        return ModelIR.load(self.path(key))

    def store(self, key: str, ir, entry: dict) -> None:
        """Save `ir` as the entry for `key` (atomic)."""
        with atomic_dir(self.path(key)) as tmp:
            ir.save(tmp)
            (tmp / ENTRY).write_text(json.dumps({"key": key, **entry}, indent=1, default=str))


def read_manifest(target_dir: Path) -> dict | None:
    """A target's manifest, or None when it is missing or damaged (the planner lowers such a target again)."""
    try:
        return load_manifest(target_dir)
    except UserError:
        return None


def load_manifest(target_dir: Path, keys: tuple[str, ...] = (), kind: str = "") -> dict:
    """A target's manifest; UserError naming the file when it is missing, unreadable, not a JSON object or without
    one of `keys` (what a runner of target `kind` reads)."""
    path = target_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object (damaged; build the target again)")
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise UserError(f"{path}: no {missing[0]!r} (not a manifest of the {kind} target, or a damaged one)")
    return manifest


def compiler_version(cmd: list[str]) -> str:
    """The first line of `cmd --version`, for cache keys and manifests; cmd[0] when it prints none or cannot run."""
    try:
        out = subprocess.run(cmd + ["--version"], check=False, capture_output=True, text=True).stdout
    except OSError:
        return cmd[0]
    return (out.splitlines() or [cmd[0]])[0]
