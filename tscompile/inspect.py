"""A model's anatomy: sizes, parameter counts, where the bytes of a decode step go, sparsity annotations.

`describe` reads tensor names, shapes and dtypes only (from the safetensors headers of a loaded checkpoint),
never tensor data, so it is instant on a 7B model.
"""
from __future__ import annotations

from typing import Any

from .checkpoint import expected_shapes
from .ir import ModelIR, exact_row_shares, ffn_names, predictor_names

CATEGORIES = ("embedding", "attention", "ffn", "norm", "lm_head", "predictor")


def tensor_category(name: str) -> str:
    """Which part of the model an expected tensor belongs to (the MoE router counts as FFN)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if ".predictor." in name:
        return "predictor"
    if ".self_attn." in name:
        return "attention"
    if name.endswith("norm.weight"):
        return "norm"
    return "ffn"


def _ffn_unit(layer: int, expert: int | None, ann, nbytes) -> dict[str, Any]:
    gate, up, down = (nbytes[n] for n in ffn_names(layer, expert))
    pred = None
    if ann.predictor is not None:
        pred = {"rank": ann.predictor.rank, "threshold": ann.predictor.threshold, "relu": ann.predictor.relu,
                "bytes": sum(nbytes[n] for n in predictor_names(layer, expert))}
    return {"expert": expert, "activation": ann.activation, "threshold": ann.threshold, "mode": ann.mode,
            "predictor": pred, "stats": ann.stats, "bytes": {"gate": gate, "up": up, "down": down}}


def _pass_label(record: Any) -> str:
    """`drelu v1` for a pass the engine recorded as {"pass", "version", "config"}; anything else as it is."""
    if isinstance(record, dict) and "pass" in record:
        return f"{record['pass']} v{record['version']}" if "version" in record else str(record["pass"])
    return str(record)


def _sparse_ffn_bytes(unit: dict[str, Any]) -> float | None:
    """Bytes a sparse decode reads for one FFN at its measured sparsity (None without a measurement)."""
    b = unit["bytes"]
    if unit["mode"] == "dense":
        return float(b["gate"] + b["up"] + b["down"])
    s = unit["stats"].get("sparsity")
    if s is None:
        return None
    active = 1.0 - float(s)
    if unit["mode"] == "exact":   # up rows where act(gate) != 0: all of them unless a pass measured it
        g, u, d = exact_row_shares(unit["stats"].get("gate_sparsity", 0.0), float(s))
        return g * b["gate"] + u * b["up"] + d * b["down"]
    return active * (b["gate"] + b["up"] + b["down"]) + (unit["predictor"] or {}).get("bytes", 0)


def describe(ir: ModelIR) -> dict[str, Any]:
    """Sizes, parameter counts and bytes by category, decode-step bytes (batch 1, dense, lm_head counted;
    tied embeddings read once for the head), and each layer's sparsity annotations."""
    cfg = ir.config
    expected = expected_shapes(cfg, ir.layers)
    params = dict.fromkeys(CATEGORIES, 0)
    stored = dict.fromkeys(CATEGORIES, 0)
    nbytes, elem = {}, {}
    for name in expected:
        shape, size = ir.weights.info(name)
        n = 1
        for d in shape:
            n *= d
        cat = tensor_category(name)
        params[cat] += n
        stored[cat] += n * size
        nbytes[name], elem[cat] = n * size, size
    extra = [n for n in ir.weights if n not in expected]
    layers = []
    for i, layer in enumerate(ir.layers):
        experts = [None] if layer.experts is None else list(range(len(layer.experts)))
        layers.append({"layer": i, "ffns": [_ffn_unit(i, e, a, nbytes)
                                            for e, a in zip(experts, layer.ffns())]})
    # one decode step reads every weight once, except: one embedding row, and only top_k of the experts
    expert_share = cfg.num_experts_per_tok / cfg.num_experts if cfg.is_moe else 1.0
    router = sum(nbytes[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(cfg.num_layers)) \
        if cfg.is_moe else 0
    ffn_dense = router + expert_share * (stored["ffn"] - router)
    head = stored["embedding"] if cfg.tie_word_embeddings else stored["lm_head"]
    decode = {"embedding": cfg.hidden_size * elem["embedding"], "attention": stored["attention"],
              "ffn": ffn_dense, "norm": stored["norm"], "lm_head": head}
    decode_total = sum(decode.values())
    passes = ir.meta.get("passes", [])          # the engine's list of records; a foreign checkpoint may differ
    out = {
        "family": cfg.family, "source": ir.meta.get("source"),
        "config": {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                   "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers,
                   "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                   "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                   "tie_word_embeddings": cfg.tie_word_embeddings, "sliding_window": cfg.sliding_window,
                   "attention_bias": cfg.attention_bias, "rope_theta": cfg.rope_theta,
                   "max_position_embeddings": cfg.max_position_embeddings},
        "params": {"total": sum(v for k, v in params.items() if k != "predictor"), **params},
        "bytes": {"total": sum(stored.values()), **stored, "extra_tensors": len(extra)},
        "decode_bytes_per_token": {"total": decode_total, **decode},
        "ffn_share_of_decode_bytes": ffn_dense / decode_total,
        "kv_cache_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4,
        "layers": layers,
        "passes": [_pass_label(p) for p in passes] if isinstance(passes, list) else [_pass_label(passes)],
    }
    units = [u for layer in layers for u in layer["ffns"]]
    sparse = [_sparse_ffn_bytes(u) for u in units]
    if any(u["mode"] != "dense" for u in units) and all(b is not None for b in sparse):
        ffn_sparse = router + expert_share * sum(sparse)
        out["sparse_decode_estimate"] = {"ffn_bytes": ffn_sparse,
                                         "total_bytes": decode_total - ffn_dense + ffn_sparse,
                                         "ffn_reduction": ffn_dense / ffn_sparse if ffn_sparse else None}
    return out


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    return ""


def _layer_row(layer: dict[str, Any]) -> list[str]:
    """One table row per layer; MoE layers summarize their experts (value, or a min-max range)."""
    units = layer["ffns"]

    def one(values, fmt=str):
        vals = sorted(set(values), key=str)
        return fmt(vals[0]) if len(vals) == 1 else f"{fmt(vals[0])}-{fmt(vals[-1])}"

    ranks = [u["predictor"]["rank"] for u in units if u["predictor"]]
    pbytes = sum(u["predictor"]["bytes"] for u in units if u["predictor"])
    sp = [u["stats"]["sparsity"] for u in units if "sparsity" in u["stats"]]
    return [str(layer["layer"]), one([u["activation"] for u in units]),
            one([u["threshold"] for u in units], "{:g}".format),
            one([u["mode"] for u in units]), one(ranks) if ranks else "-", _size(pbytes) if ranks else "-",
            f"{sum(sp) / len(sp):.3f}" if sp else "-"]


def format_description(d: dict[str, Any]) -> str:
    c, p, b = d["config"], d["params"], d["decode_bytes_per_token"]
    moe = f", {c['num_experts']} experts (top {c['num_experts_per_tok']})" if c["num_experts"] else ""
    lines = [
        f"{d['family']} model" + (f" from {d['source']}" if d.get("source") else ""),
        f"  layers {c['num_layers']}, hidden {c['hidden_size']}, FFN {c['intermediate_size']}{moe}, "
        f"heads {c['num_heads']} (kv {c['num_kv_heads']}, dim {c['head_dim']}), vocab {c['vocab_size']}"
        + (", tied embeddings" if c["tie_word_embeddings"] else "")
        + (f", sliding window {c['sliding_window']}" if c["sliding_window"] else ""),
        "",
        f"  {'part':<11}{'params':>12}{'stored':>12}{'read/token':>13}",
    ]
    for cat in CATEGORIES:
        if p[cat] or cat in b:
            lines.append(f"  {cat:<11}{_size(p[cat], ''):>12}{_size(d['bytes'][cat]):>12}"
                         f"{_size(b[cat]) if cat in b else '-':>13}")
    lines.append(f"  {'total':<11}{_size(p['total'], ''):>12}{_size(d['bytes']['total']):>12}{_size(b['total']):>13}")
    lines.append(f"  FFN share of decode bytes: {d['ffn_share_of_decode_bytes']:.1%}; "
                 f"KV cache {_size(d['kv_cache_bytes_per_token'])}/token (fp32)")
    if "sparse_decode_estimate" in d:
        e = d["sparse_decode_estimate"]
        lines.append(f"  at the measured sparsity a decode step reads {_size(e['total_bytes'])} "
                     f"(FFN {_size(e['ffn_bytes'])}, {e['ffn_reduction']:.2f}x less)")
    if d["passes"]:
        lines.append(f"  passes applied: {', '.join(d['passes'])}")
    header = ["layer", "activation", "threshold", "mode", "pred rank", "pred bytes", "sparsity"]
    rows = [header] + [_layer_row(layer) for layer in d["layers"]]
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines.append("")
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
