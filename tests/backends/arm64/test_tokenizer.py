"""tsrun's byte-level BPE against the `tokenizers` library: identical ids, exact round trips."""
from __future__ import annotations

import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tscompile.backends.arm64.tokenizer_bin import tokenizer_blob, write_tokenizer_bin

from tscompile.errors import UserError
from tscompile.tiny import tiny_tokenizer_json

VARIANT = "qwen2-swiglu-dense-f32"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "hello  world\n\n  x", "It's 3.14159, don't we'll I'M",
    "def f(x):\n    return x**2  # comment\n\ttabbed", "Ünïcödé café naïve — “quotes” 中文字符 日本語 🙂🚀 ok",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "<s>tiny</s> specials",
    "numbers 1234567890 and ١٢٣ and ²³ ½", "   leading and trailing   ", "a\u00a0b\u2003c\u3000d",
    "x = [1, 2, 3]; y = {'a': 1}", "'s 're 've 'll 'd 'm 't 'S", "ÀÉÎÕÜ ß ø å", "Здравствуй мир", "안녕하세요",
    "∑∫√≈≠≤≥ → ← ↑", "\r\n\r\n", "end with space ", " ", "a", "  \n\t x", "é\u0301 combining",
]


@pytest.fixture(scope="module")
def tokenizers_bin(built, smollm2_ir, tmp_path_factory):
    """name -> (tokenizer.bin path, tokenizers.Tokenizer, tsrun host binary)."""
    from tokenizers import Tokenizer
    b = built(VARIANT)
    d = tmp_path_factory.mktemp("tok")
    out = {}
    for name, text in (("tiny", tiny_tokenizer_json()), ("smollm2", smollm2_ir.tokenizer_json)):
        write_tokenizer_bin(text, d / f"{name}.bin")
        out[name] = (d / f"{name}.bin", Tokenizer.from_str(text), str(b.outdir / "bin" / "tsrun-host"))
    return out


def c_encode(host: str, path, text: str) -> list[int]:
    res = subprocess.run([host, "unused", "--tokenizer", str(path), "--encode-only", "--prompt", text],
                         check=True, capture_output=True, text=True)
    return [int(i) for i in res.stdout.strip().split(",") if i]


def c_decode(host: str, path, ids: list[int]) -> bytes:
    return subprocess.run([host, "unused", "--tokenizer", str(path), "--decode-ids", ",".join(map(str, ids))],
                          check=True, capture_output=True).stdout


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_ids_equal_tokenizers_library_and_round_trip(tokenizers_bin, name):
    path, hf, host = tokenizers_bin[name]
    for text in TEXTS:
        want = hf.encode(text).ids
        assert c_encode(host, path, text) == want, text
        assert c_decode(host, path, want) == text.encode(), text


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_random_text_matches_tokenizers_library(tokenizers_bin, name):
    path, hf, host = tokenizers_bin[name]
    alphabet = st.sampled_from(list("abcXYZ019 '\n\t.,!?-_()#\"") + ["é", "ß", "中", "🙂", "\u00a0", "١", "²", "—",
                                                                        "Ω", "ж", "<|im_end|>", "<s>"])

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(alphabet, min_size=1, max_size=24).map("".join))
    def check(text):
        want = hf.encode(text).ids
        assert c_encode(host, path, text) == want
        assert c_decode(host, path, want) == text.encode()
    check()


def test_prompt_text_runs_the_same_ids(built):
    """--prompt TEXT feeds exactly the ids the tokenizers library gives (logits equal --prompt-ids)."""
    import numpy as np
    from tokenizers import Tokenizer
    from tscompile.backends.arm64 import BACKEND
    b = built(VARIANT)
    text = "Sparse models compute 12 neurons."
    ids = Tokenizer.from_str(b.ir.tokenizer_json).encode(text).ids
    runner = BACKEND.load(b.outdir, where="host")
    a, c = b.outdir / "a.f32", b.outdir / "c.f32"
    runner.run(["--prompt", text, "--steps", "1", "--dump-logits", str(a)])
    runner.run(["--prompt-ids", ",".join(map(str, ids)), "--steps", "1", "--dump-logits", str(c)])
    np.testing.assert_array_equal(np.fromfile(a, "<f4"), np.fromfile(c, "<f4"))


def test_unsupported_tokenizers_are_user_errors():
    import json
    spec = json.loads(tiny_tokenizer_json())
    spec["normalizer"] = {"type": "NFC"}
    with pytest.raises(UserError, match="normalizer"):
        tokenizer_blob(json.dumps(spec))
    spec = json.loads(tiny_tokenizer_json())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(UserError, match="pre_tokenizer"):
        tokenizer_blob(json.dumps(spec))
    spec = json.loads(tiny_tokenizer_json())
    spec["model"]["type"] = "Unigram"
    with pytest.raises(UserError, match="byte-level BPE"):
        tokenizer_blob(json.dumps(spec))
    for flags, said in [({"lstrip": True}, "lstrip"),
                        ({"rstrip": True, "single_word": True}, "rstrip and single_word")]:
        spec = json.loads(tiny_tokenizer_json())   # HF strips the spaces around such a token; tsrun kept them
        spec["added_tokens"][-1] |= flags
        content = spec["added_tokens"][-1]["content"]
        error = f"tokenizer.json: added token {content!r} has {said}, which the arm64 tokenizer does not implement"
        with pytest.raises(UserError, match="^" + re.escape(error) + "$"):
            tokenizer_blob(json.dumps(spec))
