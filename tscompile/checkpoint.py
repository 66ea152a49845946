"""HF-style checkpoint I/O: load an HF dir or a sparse checkpoint into a ModelIR, save one atomically.

Every problem with a user's files is a UserError naming the file and tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path

from .cache import atomic_dir
from .errors import UserError
from .ir import ArchConfig, LayerSparsity, ModelIR, Weights, ffn_names, predictor_names

INDEX = "model.safetensors.index.json"
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def expected_shapes(cfg: ArchConfig, layers: list[LayerSparsity]) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config must have, with its shape."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        s |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
              f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
              f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q)}
        if cfg.attention_bias:
            s |= {f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                  f"{p}.self_attn.v_proj.bias": (kv,)}
        experts = [None] if not cfg.is_moe else list(range(cfg.num_experts))
        if cfg.is_moe:
            s[f"{p}.block_sparse_moe.gate.weight"] = (cfg.num_experts, H)
        for e in experts:
            g, u, d = ffn_names(i, e)
            s |= {g: (I, H), u: (I, H), d: (H, I)}
            ann = layers[i] if e is None else layers[i].experts[e]
            if ann.predictor is not None:
                f1, f2 = predictor_names(i, e)
                s |= {f1: (ann.predictor.rank, H), f2: (I, ann.predictor.rank)}
    return s


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def add_generation_eos(cfg: ArchConfig, path: Path) -> None:
    """The EOS ids of generation_config.json after config.json's (Llama-3 instruct lists <|eot_id|> only there)."""
    if not path.is_file():
        return
    gen = _read_json(path)
    ids = gen.get("eos_token_id") if isinstance(gen, dict) else None
    extra = [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None and i not in cfg.eos_ids]
    if extra:
        cfg.eos_token_id = [*cfg.eos_ids, *extra]
        cfg.check(str(path))


def read_tokenizer(path: Path, vocab_size: int) -> str | None:
    """tokenizer.json's text (None when there is none), checked now: every later user parses it unguarded."""
    if not path.exists():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the tokenizer ({type(e).__name__}: {e})") from None
    from tokenizers import Tokenizer
    try:
        n = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    except Exception as e:     # tokenizers raises a bare Exception for any parse error
        raise UserError(f"{path}: not a valid tokenizer ({' '.join(str(e).split())})") from None
    if n > vocab_size:
        raise UserError(f"{path}: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    return text


def read_safetensors_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without loading tensors (no huge allocation on bad input)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: truncated safetensors file (no header)")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 100 * 1024**2):
                raise UserError(f"{path}: safetensors header length {n} exceeds the file size")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt safetensors header") from None
    except OSError as e:      # a directory where the file should be, say
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - n
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name}: corrupt header entry") from None
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise UserError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= data_len):
            raise UserError(f"{path}: tensor {name}: data lies outside the file (truncated?)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)) or \
                math.prod(shape) * ST_DTYPES[dtype] != hi - lo:
            raise UserError(f"{path}: tensor {name}: shape {shape} and dtype {dtype} do not match its data size")
        spans.append((lo, hi, name))
    end = 0   # the tensors tile the data section, as the safetensors reader requires
    for lo, hi, name in sorted(spans):
        if lo != end:
            raise UserError(f"{path}: tensor {name}: data at byte {lo} " + (
                "overlaps another tensor's" if lo < end else f"leaves bytes {end}-{lo} of the data unused"))
        end = hi
    if end != data_len:
        raise UserError(f"{path}: {data_len - end} bytes after the last tensor's data (corrupt or not safetensors)")
    return header


def _weight_files(root: Path) -> dict[str, Path]:
    """name -> file, from a single model.safetensors, an index, or every *.safetensors in the dir."""
    index = root / INDEX
    if index.exists():
        index_json = _read_json(index)
        wm = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(wm, dict):
            raise UserError(f"{index}: no weight_map")
        files = {}
        for name, fname in wm.items():
            p = root / str(fname)
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise UserError(f"{index}: tensor {name}: shard name {fname!r} is not a plain file name")
            if not p.exists():
                raise UserError(f"{index}: tensor {name}: shard {fname} is missing")
            files[name] = p
        headers = {p: read_safetensors_header(p) for p in set(files.values())}
        for name, p in files.items():
            if name not in headers[p]:
                raise UserError(f"{p}: tensor {name} listed in {INDEX} is not in the shard")
        return files
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{root}: no *.safetensors weights found")
    files = {}
    for p in shards:
        for name in read_safetensors_header(p):
            if name != "__metadata__":
                files[name] = p
    return files


def validate_weights(ir: ModelIR, where: Path, check_values: bool = True) -> None:
    """Every expected tensor is present with the right shape and, when `check_values` (which reads every
    tensor's data; without it only headers are read), has a float dtype and finite values. A bias the model does
    not expect is refused: dropping it would change the outputs in silence (HF Llama's attention_bias puts one on
    o_proj too, its mlp_bias on the FFN)."""
    want = expected_shapes(ir.config, ir.layers)
    for name in ir.weights:
        if name.endswith(".bias") and name not in want:
            raise UserError(f"{where}: tensor {name}: not supported (tscompile's {ir.config.family} layers have "
                            "no bias there)")
    for name, shape in want.items():
        if name not in ir.weights:
            raise UserError(f"{where}: missing tensor {name}")
        got, _ = ir.weights.info(name)     # from the header: no tensor data read
        if got != shape:
            raise UserError(f"{where}: tensor {name} has shape {got}, expected {shape}")
        if not check_values:
            continue
        t = ir.weights[name]
        if not t.is_floating_point():
            raise UserError(f"{where}: tensor {name} has dtype {t.dtype}, expected a float type")
        if not all_finite(t):
            raise UserError(f"{where}: tensor {name} contains NaN or Inf")


def all_finite(t, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in slices: a whole-tensor check of a big embedding briefly doubles its memory."""
    import torch
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def load_checkpoint(root: Path, check_values: bool = True) -> ModelIR:
    """Load an HF checkpoint dir or a tscompile sparse checkpoint."""
    if not root.is_dir():
        raise UserError(f"{root}: not a checkpoint directory")
    where = root / "config.json"
    cfg_json = _read_json(where)
    cfg = ArchConfig.from_hf(cfg_json, str(where))
    add_generation_eos(cfg, root / "generation_config.json")
    ts = cfg_json.get("tscompile", {})
    if not isinstance(ts, dict):
        raise UserError(f"{where}: tscompile: expected an object")
    if ts and ts.get("format_version") != 1:
        raise UserError(f"{where}: tscompile.format_version {ts.get('format_version')!r} "
                        "is not supported (expected 1)")
    layers_json, meta = ts.get("layers"), ts.get("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f"{where}: tscompile.meta: expected an object")
    if layers_json is not None and (not isinstance(layers_json, list) or len(layers_json) != cfg.num_layers):
        raise UserError(f"{where}: tscompile.layers must list {cfg.num_layers} layers")
    layers = []
    for i, d in enumerate(layers_json or []):
        if not isinstance(d, dict):
            raise UserError(f"{where}: tscompile.layers[{i}]: expected an object")
        experts = d.get("experts")
        if cfg.is_moe and not (isinstance(experts, list) and len(experts) == cfg.num_experts
                               and all(isinstance(e, dict) for e in experts)):
            raise UserError(f"{where}: tscompile.layers[{i}].experts: "
                            f"expected a list of {cfg.num_experts} objects")
        if not cfg.is_moe and experts is not None:
            raise UserError(f"{where}: tscompile.layers[{i}].experts: not allowed (the model has no experts)")
        layers.append(LayerSparsity.from_json(d, f"{where}: tscompile.layers[{i}]"))
    ir = ModelIR(cfg, Weights(_weight_files(root)), read_tokenizer(root / "tokenizer.json", cfg.vocab_size),
                 layers, meta)
    validate_weights(ir, root, check_values)
    return ir


def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Tensor names in sorted order, grouped: a new shard starts when the next tensor would pass shard_bytes."""
    shards, cur, cur_bytes = [], [], 0
    for name in sorted(sizes):
        if cur and cur_bytes + sizes[name] > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += sizes[name]
    shards.append(cur)
    return shards


def _is_sparse_checkpoint(path: Path) -> bool:
    """Whether `path` holds a config.json with a tscompile section (something a save may replace)."""
    try:
        cfg_json = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg_json, dict) and isinstance(cfg_json.get("tscompile"), dict)


def check_replaceable(out: Path) -> None:
    """A save replaces `out` whole: refuse unless it is absent, an empty dir or an earlier sparse checkpoint."""
    try:
        if not os.path.lexists(out) or (out.is_dir() and (not any(out.iterdir())
                                                          or _is_sparse_checkpoint(out))):
            return
    except OSError as e:
        raise UserError(f"{out}: cannot read ({e.strerror})") from None
    raise UserError(f"{out}: exists and is not a tscompile checkpoint (refusing to replace it)")


def save_checkpoint(ir: ModelIR, out: Path, shard_bytes: int) -> None:
    """Write into a temp dir beside `out`, then rename: a killed save never leaves a complete-looking dir
    (and its temp dir is named so that `cache.sweep_stale` removes it).

    Shards are planned from tensor sizes, then read and written one at a time, so saving a lazily loaded
    model holds at most one shard in memory.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm
    out = Path(os.path.abspath(out))     # "." or "x/..": the published dir needs a real name
    check_replaceable(out)
    with atomic_dir(out) as tmp:
        sizes = {}
        for name in ir.weights:
            shape, elem = ir.weights.info(name)
            sizes[name] = math.prod(shape) * elem
        plan = plan_shards(sizes, shard_bytes)
        fnames = ["model.safetensors"] if len(plan) == 1 else \
            [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
        total = sum(sizes.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"save {out.name}", file=sys.stderr,
                  disable=True if total < 256 * 1024**2 else None) as bar:   # None: terminals only
            for names, fname in zip(plan, fnames):
                try:
                    save_file(_untie({n: ir.weights[n].contiguous() for n in names}), str(tmp / fname),
                              metadata={"format": "pt"})
                except Exception as e:   # safetensors reports a full disk as text ending in "(os error N)"
                    code = re.search(r"\(os error (\d+)\)", str(e))
                    if code is None:
                        raise
                    raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp / fname)) from None
                bar.update(sum(sizes[n] for n in names))
        if len(plan) > 1:
            wm = {n: fname for names, fname in zip(plan, fnames) for n in names}
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
        (tmp / "config.json").write_text(json.dumps(ir.config_json(), indent=1, default=_json_default))
        if ir.tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(ir.tokenizer_json)


def _untie(tensors: dict) -> dict:
    # safetensors refuses tensors sharing storage; clone the rare shared ones.
    seen, out = set(), {}
    for n, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[n] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    raise TypeError(f"not JSON serializable: {type(o)}")
