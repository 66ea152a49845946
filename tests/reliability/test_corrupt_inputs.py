"""Corrupted inputs: GGUF files, safetensors headers, sharded indexes and tokenizer.json files that
tests/tscompile/test_checkpoint.py and test_importers.py do not already cover, each refused with a one-line
UserError naming the file, never a crash, and loaded under a 3 GB address-space limit (RLIMIT_AS), so a loader
that believed an absurd declared size and allocated it would fail here. Through the CLI, `tscompile import BAD
--out DIR` exits 2 with one line and leaves DIR absent.

Hostile arm64 weight blobs (over 80 of them) are in tests/backends/arm64/test_blob.py; broken blobs and
out-of-vocabulary token ids through the Python runner (the path of `tscompile verify/generate`) are in
test_user_strings.py, on the artifact it builds.
"""
from __future__ import annotations

import json
import math
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import ROOT, assert_one_line_error, run_cli

from tscompile.checkpoint import INDEX
from tscompile.tiny import make_tiny_ir

sys.path.insert(0, str(ROOT / "tests" / "tscompile"))
from test_importers import write_gguf

MEMORY_LIMIT = 3 * 1024**3     # torch + tokenizers + a tiny model need ~1 GB of address space


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


# ---- the variants -------------------------------------------------------------------------------------


def gguf_variants(path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, text the error must hold): header fields, metadata and tensor infos patched."""
    from gguf import GGUFReader
    data = path.read_bytes()
    reader = GGUFReader(path)
    f, t0 = reader.fields, reader.tensors[0].field     # tensor info parts: name len, name, n_dims, dims, type, offset

    def at(field, part: int) -> int:
        return field.offset + sum(p.nbytes for p in field.parts[:part])

    def put(fmt: str, offset: int, value) -> bytes:
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    def value(key):
        return at(f[key], 3)
    readable = "not a readable GGUF file"
    return {
        "gguf only the magic": (data[:4], readable),
        "gguf header cut in the counts": (data[:20], readable),
        "gguf version 99": (put("<I", 4, 99), "version 99"),
        "gguf 2^63 tensors declared": (put("<Q", 8, 2**63), readable),
        "gguf 2^63 metadata keys declared": (put("<Q", 16, 2**63), readable),
        "gguf key length 2^63": (put("<Q", at(f["general.architecture"], 0), 2**63), readable),
        "gguf string length 2^62": (put("<Q", at(f["general.architecture"], 3), 2**62), readable),
        "gguf architecture not UTF-8": (put("<5s", at(f["general.architecture"], 4), b"\xff\xfe\x00ab"),
                                        "general.architecture is corrupt"),
        "gguf value type 99": (put("<I", at(f["llama.block_count"], 2), 99), readable),
        "gguf token array of 2^60": (put("<Q", at(f["tokenizer.ggml.tokens"], 4), 2**60), readable),
        "gguf token array element type 99": (put("<I", at(f["tokenizer.ggml.tokens"], 3), 99), readable),
        "gguf tensor with 200 dims": (put("<I", at(t0, 2), 200), readable),
        "gguf tensor dim 2^40": (put("<Q", at(t0, 3), 2**40), readable),
        "gguf tensor dim 0": (put("<Q", at(t0, 3), 0), "has shape (384, 0)"),
        "gguf tensor type 250": (put("<I", at(t0, 4), 250), readable),
        "gguf tensor offset 2^40": (put("<Q", at(t0, 5), 2**40), readable),
        "gguf tensor offset misaligned": (put("<Q", at(t0, 5), 3), "lm_head.weight"),
        "gguf last byte cut": (data[:-1], readable),
        "gguf block_count 1000": (put("<I", value("llama.block_count"), 1000), "missing tensor model.layers.2."),
        "gguf block_count 2^31": (put("<I", value("llama.block_count"), 2**31), "num_hidden_layers 2147483648"),
        "gguf head_count 0": (put("<I", value("llama.attention.head_count"), 0), "num_attention_heads must be"),
        "gguf embedding_length 65": (put("<I", value("llama.embedding_length"), 65), "expected (384, 65)"),
        "gguf bos_token_id 10^6": (put("<I", value("tokenizer.ggml.bos_token_id"), 10**6), "bos_token_id 1000000"),
        "gguf rms eps NaN": (put("<f", value("llama.attention.layer_norm_rms_epsilon"), math.nan), "rms_norm_eps"),
        "gguf rope base -1": (put("<f", value("llama.rope.freq_base"), -1.0), "rope_theta"),
    }


def with_header(data: bytes, edit) -> bytes:
    """A safetensors file with its JSON header edited (the data after it unchanged)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = edit(json.loads(data[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def entry(field: str, value):
    def edit(h):
        h[first_tensor(h)][field] = value
        return h
    return edit


SAFETENSORS = {   # name -> (header edit, text the error must hold)
    "safetensors header is a list": (lambda h: [1, 2], "corrupt safetensors header"),
    "safetensors header not UTF-8": (lambda h: b'{"\xff": 1}', "corrupt safetensors header"),
    "safetensors header length 0": (lambda h: b"", "corrupt safetensors header"),
    "safetensors offsets reversed": (entry("data_offsets", [64, 0]), "outside the file"),
    "safetensors offsets negative": (entry("data_offsets", [-8, 0]), "outside the file"),
    "safetensors offsets not numbers": (entry("data_offsets", ["a", "b"]), "outside the file"),
    "safetensors dtype F8_E4M3": (entry("dtype", "F8_E4M3"), "unsupported dtype F8_E4M3"),
    "safetensors shape negative": (entry("shape", [-1, 64]), "do not match"),
    "safetensors shape 2^40 x 2^40": (entry("shape", [2**40, 2**40]), "do not match"),
    "safetensors entry not a mapping": (lambda h: {**h, first_tensor(h): 7}, "corrupt header entry"),
}

INDEXES = {   # name -> (index edit, text the error must hold)
    "index weight_map is a list": (lambda ix: {**ix, "weight_map": list(ix["weight_map"])}, "no weight_map"),
    "index is a JSON list": (lambda ix: [ix], "no weight_map"),
    "index shard name is a number": (lambda ix: {**ix, "weight_map": {**ix["weight_map"], DOWN: 5}},
                                     "not a plain file name"),
    "index shard name absolute": (lambda ix: {**ix, "weight_map": {**ix["weight_map"], DOWN: "/etc/passwd"}},
                                  "not a plain file name"),
    "index weight_map empty": (lambda ix: {**ix, "weight_map": {}}, "missing tensor"),
}
DOWN = "model.layers.0.mlp.down_proj.weight"

TOKENIZERS = {    # name -> (tokenizer.json bytes from the good text, text the error must hold)
    "tokenizer not UTF-8": (lambda t: b"\xff\xfe" + t.encode(), "cannot read the tokenizer"),
    "tokenizer truncated": (lambda t: t.encode()[:len(t) // 2], "not a valid tokenizer"),
    "tokenizer empty": (lambda t: b"", "not a valid tokenizer"),
    "tokenizer model is a number": (lambda t: json.dumps({**json.loads(t), "model": 3}).encode(),
                                    "not a valid tokenizer"),
    "tokenizer a JSON list": (lambda t: b"[]", "not a valid tokenizer"),
    "tokenizer with more tokens than the model": (
        lambda t: json.dumps({**json.loads(t), "added_tokens": json.loads(t)["added_tokens"] + [
            {"id": 5000, "content": "<evil>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}]}).encode(), "more than the model's vocab_size 384"),
}


@pytest.fixture(scope="module")
def corrupt_cases(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (path to load, text the error must hold); each variant in its own file or directory."""
    root = tmp_path_factory.mktemp("corrupt inputs")
    ir = make_tiny_ir("llama")
    good = root / "good"
    ir.save(good)
    sharded = root / "good-sharded"
    from tscompile.checkpoint import save_checkpoint
    save_checkpoint(ir, sharded, shard_bytes=40_000)
    write_gguf(ir, root / "good.gguf")
    cases: dict[str, tuple[Path, str]] = {}

    def variant(name: str, src: Path) -> Path:
        dst = root / name.replace(" ", "_").replace("/", "_")
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        return dst

    for name, (data, needle) in gguf_variants(root / "good.gguf").items():
        p = root / (name.replace(" ", "_") + ".gguf")
        p.write_bytes(data)
        cases[name] = (p, needle)
    st = (good / "model.safetensors").read_bytes()
    for name, (edit, needle) in SAFETENSORS.items():
        d = variant(name, good)
        (d / "model.safetensors").write_bytes(with_header(st, edit))
        cases[name] = (d, needle)
    d = variant("safetensors is a directory", good)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    cases["safetensors is a directory"] = (d, "model.safetensors")
    d = variant("safetensors links to /dev/zero", good)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/dev/zero")
    cases["safetensors links to /dev/zero"] = (d, "model.safetensors")
    index = json.loads((sharded / INDEX).read_text())
    for name, (edit, needle) in INDEXES.items():
        d = variant(name, sharded)
        (d / INDEX).write_text(json.dumps(edit(index)))
        cases[name] = (d, needle)
    d = variant("index shard is a directory", sharded)
    shard = index["weight_map"][DOWN]
    (d / shard).unlink()
    (d / shard).mkdir()
    cases["index shard is a directory"] = (d, shard)
    text = (good / "tokenizer.json").read_text()
    for name, (make, needle) in TOKENIZERS.items():
        d = variant(name, good)
        (d / "tokenizer.json").write_bytes(make(text))
        cases[name] = (d, needle)
    d = variant("tokenizer is a directory", good)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").mkdir()
    cases["tokenizer is a directory"] = (d, "cannot read the tokenizer")
    return cases


def test_corrupt_inputs_are_one_line_errors_under_a_memory_limit(corrupt_cases, tmp_path):
    assert len(corrupt_cases) >= 45
    (tmp_path / "cases.json").write_text(json.dumps({k: str(p) for k, (p, _) in corrupt_cases.items()}))
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("load_worker.py")),
                          str(tmp_path / "cases.json"), str(tmp_path / "out.json")], capture_output=True, text=True,
                         timeout=300, preexec_fn=limit_memory, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    outcomes = json.loads((tmp_path / "out.json").read_text())
    bad = {}
    for name, (path, needle) in corrupt_cases.items():
        outcome, msg = outcomes[name]
        if outcome != "UserError" or "\n" in msg or str(path) not in msg or needle not in msg:
            bad[name] = (outcome, msg[:300], needle)
    assert not bad, json.dumps(bad, indent=1)


def test_the_memory_limit_is_real(tmp_path):
    """The worker's limit stops a 4 GB allocation (so a loader that made one would be caught)."""
    res = subprocess.run([sys.executable, "-c", "bytearray(4 * 1024**3)"], capture_output=True, text=True,
                         preexec_fn=limit_memory, timeout=60, check=False)
    assert res.returncode != 0 and "MemoryError" in res.stderr


@pytest.mark.parametrize("name", ["gguf tensor dim 2^40", "safetensors is a directory",
                                  "index is a JSON list", "tokenizer truncated"])
def test_import_of_a_corrupt_source_exits_2_and_writes_nothing(corrupt_cases, name, tmp_path):
    path, needle = corrupt_cases[name]
    out = tmp_path / "out dir"
    res = run_cli(["import", str(path), "--out", str(out)], cwd=tmp_path)
    assert_one_line_error(res, str(path), needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []
