"""relufy: L1 schedule, a short CPU fine-tune of a tiny dReLU model, kill -9 + resume, gloo FSDP vs one process."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from tscompile.passes.profile import frequency_name, profile_model
from tscompile.passes.relufy import L1Ramp, RelufyConfig, Stage, apply_relufy

from tscompile.errors import UserError
from tscompile.tiny import add_random_predictors, make_tiny_ir
from tscompile.trainer import TokenWindows, l1_at, lr_at, stage_bounds

# A child process that trains the tiny model; `markov_windows` makes learnable, deterministic text.
RUNNER = textwrap.dedent('''
    import json, os, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from tscompile.passes.relufy import RelufyConfig
    from tscompile.reference import ReferenceModel
    from tscompile.tiny import make_tiny_ir
    from tscompile.trainer import TokenWindows, train, full_state_dict
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_relufy import markov_windows, CONFIG
    cfg = RelufyConfig.model_validate(json.loads(os.environ["RELUFY_CFG"]))
    work = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = ReferenceModel.from_ir(make_tiny_ir("mistral", "drelu", seed=0))
    if os.environ.get("RELUFY_FORWARD_SLEEP"):      # slow the run down so the test can kill it mid-way
        import time
        fwd = model.forward
        model.forward = lambda *a, **k: (time.sleep(float(os.environ["RELUFY_FORWARD_SLEEP"])), fwd(*a, **k))[1]
    res = train(model, cfg, TokenWindows(markov_windows(256, 32), seed=1), {"text": markov_windows(8, 32, seed=9)},
                work, progress=False)
    sd = full_state_dict(model)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(work, "final.safetensors"))
    if world > 1:   # leave together: a rank exiting with a live gloo group can abort ("terminate called ...")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')

CONFIG = {"stages": [{"name": "recover", "steps": 4, "lr": 3e-3, "warmup": 1},
                     {"name": "sparsify", "steps": 6, "l1": {"schedule": "sine", "from": 0.0, "to": 2e-3}},
                     {"name": "hold", "steps": 4, "l1": 2e-3}],
          "lr": 2e-3, "batch_tokens": 256, "micro_batch": 2, "checkpoint_every": 3, "eval_every": 7}


def markov_windows(n: int, seq_len: int, vocab: int = 384, seed: int = 0) -> np.ndarray:
    """Windows [n, seq_len+1] of a sparse first-order Markov chain (4 successors per token)."""
    rng = np.random.default_rng(seed)
    succ = np.random.default_rng(0).integers(3, vocab, size=(vocab, 4))
    out = np.empty((n, seq_len + 1), dtype=np.uint16)
    tok = int(rng.integers(3, vocab))
    for i in range(n):
        for j in range(seq_len + 1):
            out[i, j] = tok
            tok = int(succ[tok, rng.integers(0, 4)])
    return out


def stages(*specs):
    return [Stage.model_validate(s) for s in specs]


def test_l1_schedule_matches_prosparse_formula():
    st = stages({"name": "a", "steps": 10}, {"name": "b", "steps": 20, "l1": {"schedule": "sine", "to": 0.05}},
                {"name": "c", "steps": 5, "l1": 0.05},
                {"name": "d", "steps": 8, "l1": {"schedule": "sine", "to": 0.2}})
    assert stage_bounds(st) == [(0, 10), (10, 30), (30, 35), (35, 43)]
    assert all(l1_at(st, t) == 0.0 for t in range(10))

    def eta(s, t0, t1):
        return 0.5 * (math.sin(-math.pi / 2 + math.pi * (s - t0) / (t1 - t0)) + 1)
    for step in (10, 13, 19, 24, 29):          # 0-based steps; ProSparse counts 1-based s = step + 1
        assert l1_at(st, step) == pytest.approx(0.05 * eta(step + 1, 10, 30), abs=1e-15)
    assert l1_at(st, 10) == pytest.approx(0.05 * (1 - math.cos(math.pi / 20)) / 2)   # first ramp step > 0
    assert l1_at(st, 19) == pytest.approx(0.025)                                      # halfway
    assert l1_at(st, 29) == pytest.approx(0.05)                                       # stage end = `to`
    assert [l1_at(st, t) for t in range(30, 35)] == [0.05] * 5
    # the next ramp starts from the previous stage's λ
    for step in (35, 38, 42):
        assert l1_at(st, step) == pytest.approx(0.05 + eta(step + 1, 35, 43) * 0.15)
    assert l1_at(st, 42) == pytest.approx(0.2) and l1_at(st, 1000) == pytest.approx(0.2)
    explicit = stages({"name": "a", "steps": 4, "l1": 0.3},
                      {"name": "b", "steps": 4, "l1": {"schedule": "sine", "from": 0.0, "to": 0.1}})
    assert l1_at(explicit, 4) == pytest.approx(0.1 * eta(5, 4, 8))


def test_lr_warmup_then_cosine_per_stage():
    st = stages({"name": "a", "steps": 10, "lr": 1.0, "warmup": 2},
                {"name": "b", "steps": 4, "lr_schedule": "constant"})
    lrs = [lr_at(st, t, base_lr=0.5, min_lr_ratio=0.1) for t in range(14)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:10], lrs[3:10]))
    assert lrs[10:] == [0.5] * 4


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="steps"):
        RelufyConfig.model_validate({"stages": [{"name": "x", "steps": 0}]})
    with pytest.raises(Exception, match="schedule"):
        RelufyConfig.model_validate({"stages": [{"name": "x", "steps": 2, "l1": {"schedule": "cos", "to": 1}}]})
    assert isinstance(RelufyConfig.model_validate(CONFIG).stages[1].l1, L1Ramp)


@pytest.mark.parametrize("relufy, want", [
    ("{batch_tokens: 32, stages: [{name: a, steps: 1}]}", "batch_tokens: must hold at least one window of seq_len "
                                                           "64 tokens, got 32"),
    ("{batch_tokens: 384, micro_batch: 4, stages: [{name: a, steps: 1}]}", "micro_batch: must divide the 6 windows "
                                                                           "of a step (batch_tokens 384 / seq_len "
                                                                           "64), got 4"),
])
def test_batch_that_is_not_whole_windows_is_a_plan_error(relufy, want, tmp_path):
    from tscompile.engine import plan_build
    from tscompile.spec import parse_spec
    (tmp_path / "t.txt").write_text("some training text")
    spec = parse_spec("version: 1\nname: r\nsource: {tiny: {family: llama, layers: 1, hidden: 32, intermediate: 64, "
                      "heads: 2, kv_heads: 1, vocab: 300}}\n"
                      f"data: {{train: {{mixture: [{{path: {tmp_path / 't.txt'}}}], seq_len: 64}}}}\n"
                      f"pipeline: [drelu: {{}}, relufy: {relufy}]\n", "r.yaml")
    with pytest.raises(UserError) as e:
        plan_build(spec, tmp_path / "b", dry_run=True)
    assert str(e.value) == f"r.yaml:5: pipeline[1].relufy.{want}"


def test_held_out_windows_fewer_than_ranks_is_an_error_not_perplexity_1(monkeypatch):
    import contextlib

    import tscompile.trainer as trainer
    monkeypatch.setattr(trainer, "_world", lambda: (2, 0))
    with pytest.raises(UserError, match="1 held-out window.s. cannot be shared by 2 ranks"):
        trainer.evaluate(None, np.zeros((1, 9), np.int32), 4, "cpu", contextlib.nullcontext)


def test_needs_relu_activation(tmp_path):
    from tscompile.api import Context
    ir = make_tiny_ir("mistral", "swiglu")
    with pytest.raises(UserError, match="layer 0 has activation swiglu"):
        apply_relufy(ir, RelufyConfig.model_validate(CONFIG), Context(spec=None, build_dir=tmp_path,
                                                                        work_dir=tmp_path))


def test_refuses_a_predictor_fitted_before(tmp_path):
    from tscompile.api import Context
    ir = add_random_predictors(make_tiny_ir("mistral", "drelu"), rank=8, threshold=0.0)
    with pytest.raises(UserError, match="^pipeline relufy: layer 0 has a predictor fitted to the FFN relufy changes"):
        apply_relufy(ir, RelufyConfig.model_validate(CONFIG), Context(spec=None, build_dir=tmp_path,
                                                                        work_dir=tmp_path))


def test_short_run_lowers_loss_and_raises_sparsity(tmp_path):
    from tscompile.reference import ReferenceModel
    from tscompile.trainer import train
    cfg = RelufyConfig.model_validate(dict(CONFIG, stages=[
        {"name": "recover", "steps": 15, "lr": 1e-2, "warmup": 2},
        {"name": "sparsify", "steps": 15, "l1": {"schedule": "sine", "to": 3e-2}}], lr=1e-2, eval_every=15))
    model = ReferenceModel.from_ir(make_tiny_ir("mistral", "drelu", seed=0))
    heldout = {"text": markov_windows(8, 32, seed=9)}
    res = train(model, cfg, TokenWindows(markov_windows(256, 32), seed=1), heldout, tmp_path, progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    evals = [r["heldout"]["text"] for r in log if "heldout" in r]
    assert len(evals) == 2
    assert log[-1]["ce"] < 0.75 * log[0]["ce"]
    assert evals[1]["ppl"] < evals[0]["ppl"] * 1.05          # sparsifying keeps held-out quality
    assert log[-1]["sparsity"] > log[14]["sparsity"] + 0.05   # the L1 stage moves sparsity
    assert evals[1]["sparsity"] > evals[0]["sparsity"] + 0.05
    assert len(log[-1]["per_layer_sparsity"]) == 2
    assert res.heldout["text"]["ppl"] == evals[1]["ppl"]


@pytest.mark.parametrize("target, grows", [(0.99, True), (0.01, False)])
def test_l1_control_steers_lambda_of_constant_stages_only(target, grows, tmp_path):
    from tscompile.reference import ReferenceModel
    from tscompile.trainer import train
    cfg = RelufyConfig.model_validate(dict(CONFIG, stages=[
        {"name": "constant", "steps": 4, "l1": 1e-3},
        {"name": "ramp", "steps": 3, "l1": {"schedule": "sine", "to": 2e-3}}],
        l1_control={"target": target, "gain": 0.5}, eval_every=100))
    model = ReferenceModel.from_ir(make_tiny_ir("mistral", "drelu", seed=0))
    train(model, cfg, TokenWindows(markov_windows(64, 32), seed=1), {}, tmp_path, progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    scale = [r["l1_scale"] for r in log[:4]]     # after each step: below the target sparsity, λ grows, else shrinks
    assert all((b > a) == grows for a, b in zip([1.0] + scale, scale)), scale
    assert [r["lambda"] for r in log[:4]] == pytest.approx([1e-3 * k for k in [1.0] + scale[:3]])
    # a ramp stage runs as scheduled
    assert [r["lambda"] for r in log[4:]] == pytest.approx([l1_at(cfg.stages, s) for s in (4, 5, 6)])


def _run(work, env_extra, torchrun=False):
    env = dict(os.environ, TEST_DIR=os.path.dirname(__file__), RELUFY_CFG=json.dumps(CONFIG),
               OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, "-c", RUNNER, str(work)]
    if torchrun:
        (work.parent / "runner.py").write_text(RUNNER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(work.parent / "runner.py"), str(work)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One uninterrupted single-process run of CONFIG (the reference for resume and FSDP)."""
    work = tmp_path_factory.mktemp("single") / "run"
    p = _run(work, {})
    out = p.communicate()[0]
    assert p.returncode == 0, out
    return work


def test_kill_and_resume_is_bit_identical(tmp_path, single_run):
    a, b = single_run, tmp_path / "b"
    p = _run(b, {"RELUFY_FORWARD_SLEEP": "0.05"})
    deadline = time.time() + 60
    while time.time() < deadline:
        latest = b / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["step"] >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step_killed = json.loads((b / "latest.json").read_text())["step"]
    assert not (b / "final.safetensors").exists() and step_killed < 14
    p = _run(b, {})
    out = p.communicate()[0]
    assert p.returncode == 0, out
    wa, wb = _weights(a / "final.safetensors"), _weights(b / "final.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = (a / "train_log.jsonl").read_text().splitlines()
    lb = (b / "train_log.jsonl").read_text().splitlines()
    def strip(ln):
        return {k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
    assert [strip(x) for x in la] == [strip(x) for x in lb]


def test_gloo_fsdp_two_processes_match_one(tmp_path, single_run):
    one, two = single_run, tmp_path / "two"
    p = _run(two, {}, torchrun=True)
    out = p.communicate()[0]
    assert p.returncode == 0, out
    l1 = [json.loads(x) for x in (one / "train_log.jsonl").read_text().splitlines()]
    l2 = [json.loads(x) for x in (two / "train_log.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 14
    for r1, r2 in zip(l1, l2):
        for key in ("loss", "ce", "l1", "sparsity"):
            assert r2[key] == pytest.approx(r1[key], rel=2e-3, abs=1e-4), (r1["step"], key)
    w1, w2 = _weights(one / "final.safetensors"), _weights(two / "final.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-4), k


def test_example_specs_validate(tmp_path):
    from pathlib import Path

    from tscompile.spec import parse_spec
    specs = Path(__file__).resolve().parents[2] / "specs"
    smol = parse_spec((specs / "smollm2.yaml").read_text(), "smollm2.yaml")
    cfg = next(s.config for s in smol.pipeline if s.name == "relufy")
    assert [s.name for s in smol.pipeline] == ["drelu", "relufy", "threshold"]
    assert sum(s.steps for s in cfg.stages) * cfg.batch_tokens <= 140_000_000     # ~20 GPU-minutes
    # mistral.yaml names a user's local checkpoint; point it at an existing directory to validate the rest
    (tmp_path / "config.json").write_text("{}")                       # what a checkpoint dir shows at spec time
    text = (specs / "mistral.yaml").read_text().replace("/path/to/Mistral-7B-v0.1", str(tmp_path))
    mistral = parse_spec(text, "mistral.yaml")
    cfg = next(s.config for s in mistral.pipeline if s.name == "relufy")
    assert cfg.activation_checkpointing and l1_at(cfg.stages, 10**9) == pytest.approx(5e-4)
    assert set(mistral.targets) == {"onnx", "cuda", "arm64"}


def test_pass_on_spec_data_writes_weights_and_stats(tmp_path, monkeypatch):
    """The pass end to end: spec data.train (a local text file) -> token windows -> training -> new IR."""
    from tscompile.api import Context
    from tscompile.spec import parse_spec
    monkeypatch.setenv("TSCOMPILE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["sparse", "model", "neuron", "fires", "the", "a", "quick", "fox", "def", "return", "relu", "(x)"]
    docs = [" ".join(words[i] for i in rng.integers(0, len(words), 400)) for _ in range(60)]
    (tmp_path / "text.txt").write_text("\x1e".join(docs))
    spec = parse_spec(textwrap.dedent(f"""
        version: 1
        name: t
        source: {{tiny: {{activation: drelu}}}}
        data: {{train: {{mixture: [{{path: {tmp_path / 'text.txt'}}}], seq_len: 32, held_out: 0.1}}}}
        pipeline: [{{drelu: {{}}}}]
    """), "t.yaml")
    cfg = RelufyConfig.model_validate(dict(CONFIG, eval_tokens=128))
    ir = profile_model(make_tiny_ir("mistral", "drelu", seed=0), torch.randint(3, 384, (2, 16)))
    teacher = make_tiny_ir("mistral", "swiglu", seed=0)
    ctx = Context(spec=spec, build_dir=tmp_path, work_dir=tmp_path / "work", source_ir=teacher, seed=0)
    out = apply_relufy(ir, cfg.model_copy(update={"distill": 0.5}), ctx)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(out.weights[name], ir.weights[name]) and out.weights[name].dtype == torch.float32
    assert torch.equal(ir.weights[name], make_tiny_ir("mistral", "drelu", seed=0).weights[name])   # input kept
    meta = out.meta["relufy"]
    assert meta["steps"] == 14 and set(meta["heldout"]) == {str(tmp_path / "text.txt")}
    assert all(0 < layer.stats["sparsity"] < 1 for layer in out.layers)   # measured on the held-out text
    # the profile of the weights before the fine-tune is gone (a later reorder measures again)
    assert frequency_name(0, None) in ir.weights and frequency_name(0, None) not in out.weights
    assert all("frequency_p50" in a.stats for a in ir.layers) and not any("frequency_p50" in a.stats
                                                                          for a in out.layers)
    log = [json.loads(ln) for ln in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] > 0 and len(log) == 14


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    from tscompile.reference import ReferenceModel
    from tscompile.trainer import train
    runs = []
    for ckpt in (False, True):
        cfg = RelufyConfig.model_validate(dict(CONFIG, stages=[{"name": "s", "steps": 3, "l1": 1e-2}],
                                               activation_checkpointing=ckpt))
        model = ReferenceModel.from_ir(make_tiny_ir("mistral", "drelu", seed=0))
        res = train(model, cfg, TokenWindows(markov_windows(64, 32), seed=1), {}, tmp_path / str(ckpt),
                    progress=False)
        runs.append([r[k] for r in res.history for k in ("loss", "l1", "sparsity")])
    assert len(runs[0]) == 9 and runs[1] == pytest.approx(runs[0], rel=1e-5)
