"""tokenizer.bin: a byte-level BPE tokenizer.json flattened for tsrun (layout: templates/tokenizer.c.j2)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from tscompile.cache import atomic_file
from tscompile.errors import UserError

TOKENIZER_MAGIC = b"TSRUNTK\0"
TOKENIZER_VERSION = 1
FLAG_SPLIT_DIGITS = 1
FLAG_BYTE_LEVEL_REGEX = 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _pre_tokenizer_flags(pre: dict | None, where: str) -> int:
    """Flags for the supported pre-tokenizers: ByteLevel, optionally after Digits(individual_digits)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    flags = 0
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits"):
            flags |= FLAG_SPLIT_DIGITS
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            flags |= FLAG_BYTE_LEVEL_REGEX if step.get("use_regex", True) else 0
        else:
            raise UserError(f"{where}: pre_tokenizer {json.dumps(step)} is not supported by the arm64 tokenizer "
                            "(supported: ByteLevel without add_prefix_space, Digits(individual_digits))")
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise UserError(f"{where}: the arm64 tokenizer needs a byte-level BPE (ByteLevel pre-tokenizer)")
    return flags


def tokenizer_blob(tokenizer_json: str, where: str = "tokenizer.json") -> bytes:
    """The bytes of tokenizer.bin for a byte-level BPE tokenizer.json; UserError for anything else."""
    from tokenizers import Tokenizer
    spec = json.loads(tokenizer_json)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("ignore_merges") or model.get("byte_fallback"):
        raise UserError(f"{where}: only byte-level BPE models (no ignore_merges/byte_fallback) are supported")
    if spec.get("normalizer") is not None:
        raise UserError(f"{where}: normalizer {spec['normalizer'].get('type')} is not supported by the arm64 tokenizer")
    flags = _pre_tokenizer_flags(spec.get("pre_tokenizer"), where)

    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = dict(model["vocab"])
    for t in spec.get("added_tokens", []):   # tsrun matches an added token's text exactly, as HF does without these
        if stripping := [k for k in ("lstrip", "rstrip", "single_word") if t.get(k)]:
            raise UserError(f"{where}: added token {t.get('content')!r} has {' and '.join(stripping)}, which the "
                            "arm64 tokenizer does not implement")
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    n_tokens = max(list(vocab.values()) + list(specials.values())) + 1
    pieces = [b""] * n_tokens
    for text, i in vocab.items():
        if all(c in char_to_byte for c in text):
            pieces[i] = bytes(char_to_byte[c] for c in text)
    for text, i in specials.items():
        pieces[i] = text.encode()
    # a byte without a token (SmolLM2 lacks some control bytes and those UTF-8 never uses) is -1:
    # dropped from the input, as HF's BPE does without an unk token
    byte_token = [vocab.get(bytes_to_unicode()[b], -1) for b in range(256)]

    merges = []
    for rank, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise UserError(f"{where}: merges[{rank}] {left!r} + {right!r} names a token outside the vocabulary")
        merges.append((vocab[left], vocab[right], vocab[left + right]))

    tok = Tokenizer.from_str(tokenizer_json)
    plain = tok.encode("x", add_special_tokens=False).ids
    full = tok.encode("x", add_special_tokens=True).ids
    if full[len(full) - len(plain):] != plain:
        raise UserError(f"{where}: post-processor adds tokens after the text; not supported by the arm64 tokenizer")
    prefix = full[:len(full) - len(plain)]

    out = bytearray(TOKENIZER_MAGIC)
    out += struct.pack("<6I", TOKENIZER_VERSION, n_tokens, len(merges), len(specials), flags, len(prefix))
    out += struct.pack(f"<{len(prefix)}i", *prefix)
    out += struct.pack("<256i", *byte_token)
    for p in pieces:
        out += struct.pack("<I", len(p)) + p
    for m in merges:
        out += struct.pack("<3i", *m)
    out += struct.pack(f"<{len(specials)}i", *specials.values())
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def write_tokenizer_bin(tokenizer_json: str, path: Path, where: str = "tokenizer.json") -> None:
    data = tokenizer_blob(tokenizer_json, where)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
