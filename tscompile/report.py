"""verify.json and report.md (tables + PNG plots) for a build directory."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .cache import atomic_file, write_text_atomic
from .verify import skipped_targets


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return "—" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def save_plot(path: Path, draw) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    draw(ax)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:] or "png")
    finally:
        plt.close(fig)
    return path.name


def plot_layer_sparsity(results: dict[str, Any], out: Path) -> str | None:
    q = results.get("quality") or {}
    if not q:
        return None

    def draw(ax):
        for name, r in q.items():
            ax.plot(range(len(r["layer_sparsity"])), r["layer_sparsity"], marker="o", ms=3, label=name)
        ax.set(xlabel="layer", ylabel="FFN sparsity", ylim=(0, 1), title="Measured FFN sparsity per layer")
        ax.legend()
    return save_plot(out / "layer_sparsity.png", draw)


def ffn_annotations(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, annotation) per FFN: "3" for a dense layer's MLP, "3.1" for expert 1 of an MoE layer."""
    return [(f"{i}.{e}" if a.get("experts") else str(i), ffn)
            for i, a in enumerate(results.get("annotations", []))
            for e, ffn in enumerate(a.get("experts") or [a])]


def draw_predictors(ax, ffns: list[dict[str, Any]]) -> None:
    """Per FFN (annotation dicts): true sparsity, and the predictor's predicted sparsity and held-out recall;
    FFNs left on exact gating are marked."""
    nan = float("nan")
    gated = [a["mode"] == "predictor" for a in ffns]
    st = [a.get("stats", {}) for a in ffns]
    xs = range(len(ffns))
    ax.plot(xs, [s.get("true_sparsity", nan) for s in st], ls="--", color="k", label="true sparsity")
    ax.plot(xs, [s.get("predicted_sparsity", nan) if g else nan for s, g in zip(st, gated)], marker="s", ms=3,
            label="predicted sparsity")
    ax.plot(xs, [s.get("recall", nan) if g else nan for s, g in zip(st, gated)], marker="o", ms=3, label="recall")
    exact = [k for k, g in enumerate(gated) if not g]
    if exact:
        ax.scatter(exact, [0.02] * len(exact), marker="x", color="r", label="exact gating")
    ax.set(xlabel="FFN (layer, or layer x expert)", ylim=(0, 1.02),
           title="Predictors: held-out recall vs predicted sparsity")
    ax.legend(fontsize=7, loc="lower right")


def plot_predictors(results: dict[str, Any], out: Path) -> str | None:
    ffns = [a for _, a in ffn_annotations(results)]
    if not any("recall" in a.get("stats", {}) for a in ffns):
        return None
    return save_plot(out / "predictors.png", lambda ax: draw_predictors(ax, ffns))


def plot_speedup(results: dict[str, Any], out: Path) -> str | None:
    sp = {n: r["speed"]["speedup"] for n, r in results["targets"].items() if "speed" in r}
    if not sp:
        return None

    def draw(ax):
        ax.bar(list(sp), list(sp.values()), color="#4c72b0")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(ylabel="decode speedup vs dense", title="Sparse vs dense build, same backend")
    return save_plot(out / "speedup.png", draw)


def _verdict(results: dict[str, Any]) -> str:
    if not results["ok"]:
        return "FAIL"
    skipped = skipped_targets(results)
    return f"PASS, except {', '.join(skipped)}: not verified" if skipped else "PASS"


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    env = results["environment"]
    lines = [f"# tscompile build report: {results['spec']}", "",
             f"Verdict: **{_verdict(results)}** "
             f"(verified in {results['seconds']:.1f} s on {env['cpu']}, {env['cores']} cores"
             f"{', GPU ' + env['gpu'] if env.get('gpu') else ''}; torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']})", "",
             "## Targets vs the PyTorch reference", "",
             "| target | outputs | max abs | rel L2 | top-1 | greedy | sparse tok/s | dense tok/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["targets"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        s = r.get("speed", {})
        lines.append(f"| {name} | {'ok' if r['outputs_ok'] else 'BAD'} | {_fmt(r.get('max_abs'))} | "
                     f"{_fmt(r.get('rel_l2'))} | {_fmt(r.get('top1'))} | "
                     f"{'match' if r.get('greedy_match') else 'differs'} | {_fmt(s.get('sparse_tokens_per_s'))} | "
                     f"{_fmt(s.get('dense_tokens_per_s'))} | {_fmt(s.get('speedup'), 3)} |")
    lines += [f"\n{name}: tok/s measured on {r['speed']['measured_on']}." for name, r in results["targets"].items()
              if r.get("speed", {}).get("measured_on")]
    if results.get("quality"):
        lines += ["", "## Quality vs the dense source", "",
                  "| text | tokens | sparse ppl | dense ppl | ratio | FFN sparsity |", "|---|---|---|---|---|---|"]
        for name, q in results["quality"].items():
            lines.append(f"| {name} | {q['tokens']} | {_fmt(q['perplexity'])} | {_fmt(q['dense_perplexity'])} | "
                         f"{_fmt(q['ppl_ratio'])} | {_fmt(q['sparsity'], 3)} |")
    lines += ["", "## Goals", "", "| goal | target | value | limit | ok |", "|---|---|---|---|---|"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['target']} | {_fmt(g['value'])} | {_fmt(g['limit'])} | "
                     f"{'yes' if g['ok'] else '**NO**'} |")
    lines += ["", "## Per-FFN annotations", "", "| FFN | activation | threshold | mode | predictor rank | "
              "true sparsity | predicted sparsity | recall |", "|---|---|---|---|---|---|---|---|"]
    for label, a in ffn_annotations(results):
        st, p = a.get("stats", {}), a.get("predictor")
        lines.append(f"| {label} | {a['activation']} | {_fmt(a['threshold'])} | {a['mode']} | "
                     f"{p['rank'] if p else '—'} | {_fmt(st.get('true_sparsity', st.get('sparsity')), 3)} | "
                     f"{_fmt(st.get('predicted_sparsity'), 3)} | {_fmt(st.get('recall'), 3)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def _finite(x: Any) -> Any:
    """x with every infinite or NaN float as null: JSON has no Infinity (a tampered target's errors are inf)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_report(build_dir: Path, results: dict[str, Any]) -> None:
    plots_dir = build_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = [p for p in (plot_layer_sparsity(results, plots_dir), plot_predictors(results, plots_dir),
                         plot_speedup(results, plots_dir)) if p]
    for old in plots_dir.glob("*.png"):   # an earlier verification's plot that this one did not draw
        if old.name not in plots:
            old.unlink()
    if not any(plots_dir.iterdir()):
        plots_dir.rmdir()
    write_text_atomic(build_dir / "verify.json", json.dumps(_finite(results), indent=1, default=str))
    write_text_atomic(build_dir / "report.md", render_markdown(results, plots))
