from tscompile.ir import FFNSparsity, LayerSparsity
from tscompile.report import ffn_annotations, render_markdown


def _results(layers):
    return {"spec": "s.yaml", "ok": True, "seconds": 1.0, "targets": {}, "goals": [],
            "environment": {"cpu": "x", "cores": 2, "torch": "t", "onnxruntime": "o"},
            "annotations": [layer.to_json() for layer in layers]}


def test_moe_layers_report_one_row_per_expert():
    experts = [FFNSparsity(activation="drelu", mode="predictor", stats={"recall": 0.9 + e / 100}) for e in range(3)]
    layers = [LayerSparsity(activation="swiglu"), LayerSparsity(activation="drelu", experts=experts)]
    rows = ffn_annotations(_results(layers))
    assert [label for label, _ in rows] == ["0", "1.0", "1.1", "1.2"]
    assert [a["stats"].get("recall") for _, a in rows] == [None, 0.9, 0.91, 0.92]
    md = render_markdown(_results(layers), [])
    assert "| 1.2 | drelu | 0 | predictor |" in md and "| 0 | swiglu | 0 | dense |" in md


def test_report_files_get_ordinary_permissions(tmp_path):
    import os

    from tscompile.report import write_report
    old = os.umask(0o022)
    try:
        write_report(tmp_path, _results([LayerSparsity(activation="relu")]))
    finally:
        os.umask(old)
    for name in ("verify.json", "report.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_plots_of_an_earlier_verification_are_removed(tmp_path):
    from tscompile.report import write_report
    results = _results([LayerSparsity(activation="relu")])
    write_report(tmp_path, results | {"targets": {"onnx": {"outputs_ok": True, "speed": {"speedup": 1.5}}}})
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["speedup.png"]
    assert "plots/speedup.png" in (tmp_path / "report.md").read_text()
    write_report(tmp_path, results)   # no speed measured this time: no plot, and none left behind
    assert not (tmp_path / "plots").exists() and "plots/" not in (tmp_path / "report.md").read_text()
