"""Sparse checkpoint I/O: exact round trips (single file, sharded, annotations), and one clear line per
kind of broken input, naming the file and the tensor or key."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from tscompile.checkpoint import INDEX, expected_shapes, load_checkpoint
from tscompile.errors import UserError
from tscompile.ir import FFNSparsity, ModelIR, Predictor, predictor_names
from tscompile.tiny import add_random_predictors, make_tiny_ir

DOWN = "model.layers.1.mlp.down_proj.weight"


def saved(tmp_path, ir=None, **kw):
    ir = ir or make_tiny_ir("llama", seed=0)
    ir.save(tmp_path / "ckpt", **kw)
    return tmp_path / "ckpt"


def load_error(path) -> str:
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


# ---- round trips ------------------------------------------------------------------------------------

def annotated_ir(family: str) -> ModelIR:
    kw = {"experts": 4, "top_k": 2} if family == "mixtral" else {}
    ir = add_random_predictors(make_tiny_ir(family, activation="drelu", seed=1, **kw), rank=6, threshold=0.25)
    for k, (_, _, ann) in enumerate(ir.ffn_units()):
        ann.threshold = 0.01 * k
        ann.stats = {"sparsity": 0.5 + 0.01 * k, "recall": 0.97}
    ir.layers[0].ffns()[0].mode = "exact"
    ir.meta["passes"] = [{"name": "predictors", "version": "1"}]
    return ir


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_round_trip_keeps_annotations_and_tensors(tmp_path, family):
    ir = annotated_ir(family)
    back = load_checkpoint(saved(tmp_path, ir))
    assert back.layers == ir.layers and back.meta == ir.meta and back.config == ir.config
    assert back.content_hash() == ir.content_hash()
    fc1, fc2 = predictor_names(1, 0 if family == "mixtral" else None)
    assert tuple(back.weights[fc1].shape) == (6, 64) and tuple(back.weights[fc2].shape) == (192, 6)
    assert all(torch.equal(back.weights[n], ir.weights[n]) for n in ir.weights)
    section = json.loads((tmp_path / "ckpt" / "config.json").read_text())["tscompile"]
    assert section["format_version"] == 1 and len(section["layers"]) == ir.config.num_layers
    ann = section["layers"][1]["experts"][0] if family == "mixtral" else section["layers"][1]
    assert ann["predictor"] == {"rank": 6, "threshold": 0.25, "relu": True} and ann["mode"] == "predictor"


def test_sharded_round_trip(tmp_path):
    ir = annotated_ir("mistral")
    path = saved(tmp_path, ir, shard_bytes=40_000)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and not (path / "model.safetensors").exists()
    index = json.loads((path / INDEX).read_text())
    assert set(index["weight_map"]) == set(ir.weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ir.weights.values())
    back = load_checkpoint(path)
    assert back.content_hash() == ir.content_hash()


def test_saving_over_an_old_checkpoint_replaces_it(tmp_path):
    path = saved(tmp_path, make_tiny_ir("llama", seed=0), shard_bytes=40_000)
    saved(tmp_path, make_tiny_ir("llama", seed=9))
    assert not list(path.glob("model-*")) and not list(tmp_path.glob(".ckpt.*"))
    assert torch.equal(load_checkpoint(path).weights[DOWN], make_tiny_ir("llama", seed=9).weights[DOWN])


def test_extra_tensors_are_kept(tmp_path):
    ir = make_tiny_ir("qwen2")
    ir.weights["model.layers.0.mlp.stats.frequency"] = torch.rand(192)
    back = load_checkpoint(saved(tmp_path, ir))
    assert torch.equal(back.weights["model.layers.0.mlp.stats.frequency"],
                       ir.weights["model.layers.0.mlp.stats.frequency"])


def test_expected_shapes_cover_every_family():
    ir = annotated_ir("mixtral")
    want = expected_shapes(ir.config, ir.layers)
    assert set(want) == set(ir.weights)
    assert want["model.layers.0.block_sparse_moe.gate.weight"] == (4, 64)
    assert want["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (64, 192)


# ---- broken safetensors ----------------------------------------------------------------------------

def flip_first_header_byte(data: bytes) -> bytes:
    return data[:8] + bytes([data[8] ^ 0xFF]) + data[9:]          # the header's opening brace


@pytest.mark.parametrize("corrupt,expect", [
    (lambda data: data[:-1000], "truncated"),
    (flip_first_header_byte, "corrupt safetensors header"),
    (lambda data: struct.pack("<Q", 1 << 62) + data[8:], "header length"),
    (lambda data: b"", "no header"),
])
def test_broken_safetensors_file(tmp_path, corrupt, expect):
    path = saved(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    msg = load_error(path)
    assert str(f) in msg and expect in msg
    if expect == "truncated":
        assert "tensor model." in msg


def edit_down_header(f, key, value):
    """Rewrite the safetensors header entry `key` of the down tensor in file f, keeping the header's size."""
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[DOWN][key] = value
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])


def test_header_size_disagrees_with_shape(tmp_path):
    path = saved(tmp_path)
    f = path / "model.safetensors"
    edit_down_header(f, "shape", [64, 190])
    msg = load_error(path)
    assert str(f) in msg and DOWN in msg and "do not match" in msg


@pytest.mark.parametrize("bad,expect", [
    (torch.zeros(64, 191), "has shape (64, 191), expected (64, 192)"),
    (torch.zeros(64, 192, dtype=torch.int32), "has dtype torch.int32, expected a float type"),
    (torch.full((64, 192), float("nan")), "contains NaN or Inf"),
    (torch.zeros(64, 192).index_fill_(1, torch.tensor([7]), float("inf")), "contains NaN or Inf"),
])
def test_bad_tensor(tmp_path, bad, expect):
    ir = make_tiny_ir("llama")
    ir.weights[DOWN] = bad
    path = saved(tmp_path, ir)
    msg = load_error(path)
    assert str(path) in msg and DOWN in msg and expect in msg


def test_nan_found_beyond_the_first_chunk(tmp_path):
    ir = make_tiny_ir("llama", vocab=384, hidden=64)
    emb = ir.weights["model.embed_tokens.weight"].clone()
    emb[-1, -1] = float("nan")                         # last element: only a full scan finds it
    ir.weights["model.embed_tokens.weight"] = emb
    from tscompile.checkpoint import all_finite
    assert not all_finite(emb, chunk=1000) and all_finite(emb[:-1], chunk=1000)
    assert "model.embed_tokens.weight contains NaN" in load_error(saved(tmp_path, ir))


def test_missing_tensor(tmp_path):
    ir = make_tiny_ir("llama")
    del ir.weights["model.layers.0.self_attn.k_proj.weight"]
    path = saved(tmp_path, ir)
    msg = load_error(path)
    assert str(path) in msg and "missing tensor model.layers.0.self_attn.k_proj.weight" in msg


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.o_proj.bias", "model.layers.0.mlp.up_proj.bias"])
def test_unexpected_bias(tmp_path, name):
    # HF Llama with attention_bias (o_proj too) or mlp_bias: the reference has no such bias, so loading it
    # without one would give other logits
    ir = make_tiny_ir("llama")
    ir.weights[name] = torch.ones(ir.weights[name.replace(".bias", ".weight")].shape[0])
    path = saved(tmp_path, ir)
    msg = load_error(path)
    assert str(path) in msg and f"tensor {name}: not supported (tscompile's llama layers have no bias there)" in msg


def test_missing_predictor_tensor(tmp_path):
    ir = add_random_predictors(make_tiny_ir("llama"), rank=4)
    fc1, _ = predictor_names(1)
    del ir.weights[fc1]
    assert f"missing tensor {fc1}" in load_error(saved(tmp_path, ir))


def test_no_safetensors(tmp_path):
    path = saved(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")   # pickles are never loaded
    assert "no *.safetensors weights found" in load_error(path)


# ---- broken index -------------------------------------------------------------------------------------

def sharded(tmp_path):
    return saved(tmp_path, make_tiny_ir("llama"), shard_bytes=40_000)


def edit_index(path, fn):
    index = json.loads((path / INDEX).read_text())
    fn(index["weight_map"])
    (path / INDEX).write_text(json.dumps(index))


def test_missing_shard(tmp_path):
    path = sharded(tmp_path)
    shard = sorted(path.glob("model-*"))[1]
    shard.unlink()
    msg = load_error(path)
    assert str(path / INDEX) in msg and shard.name in msg and "missing" in msg


def test_index_pointing_outside_the_dir(tmp_path):
    path = sharded(tmp_path)
    (tmp_path / "evil.safetensors").write_bytes((path / sorted(p.name for p in path.glob("model-*"))[0]).read_bytes())
    edit_index(path, lambda wm: wm.__setitem__(DOWN, "../evil.safetensors"))
    msg = load_error(path)
    assert str(path / INDEX) in msg and DOWN in msg and "not a plain file name" in msg


def test_index_names_tensor_missing_from_shard(tmp_path):
    path = sharded(tmp_path)
    wm = json.loads((path / INDEX).read_text())["weight_map"]
    other = next(f for f in sorted(set(wm.values())) if f != wm[DOWN])
    edit_index(path, lambda m: m.__setitem__(DOWN, other))
    msg = load_error(path)
    assert other in msg and DOWN in msg and "is not in the shard" in msg


def test_index_not_json(tmp_path):
    path = sharded(tmp_path)
    (path / INDEX).write_text("{ weight_map: ")
    assert str(path / INDEX) in load_error(path) and "not valid JSON" in load_error(path)


# ---- broken config.json ---------------------------------------------------------------------------

def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_not_json(tmp_path):
    path = saved(tmp_path)
    (path / "config.json").write_text('{"model_type": "llama",')
    msg = load_error(path)
    assert str(path / "config.json") in msg and "not valid JSON" in msg


def test_config_missing(tmp_path):
    path = saved(tmp_path)
    (path / "config.json").unlink()
    assert f"{path / 'config.json'}: file not found" in load_error(path)


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (lambda c: c.pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda c: c.update(num_hidden_layers="many"), "num_hidden_layers must be an integer, got 'many'"),
    (lambda c: c.update(hidden_size=64.5), "hidden_size must be an integer, got 64.5"),
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (lambda c: c.update(sliding_window=-3), "sliding_window must be positive or null, got -3"),
    (lambda c: c.update(sliding_window=True), "sliding_window must be an integer, got True"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be positive"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads (3)"),
    (lambda c: c.update(vocab_size=-5), "vocab_size must be positive"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4}), "rope_scaling type 'yarn'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4}),
     "rope_scaling type 'yarn'"),
    (lambda c: c.update(rope_parameters={"rope_theta": "big"}), "rope_parameters.rope_theta must be a number"),
    (lambda c: c.update(rope_parameters=[1e6]), "rope_parameters must be a mapping or null, got [1000000.0]"),
    (lambda c: c.update(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "a sliding window on 1 of 2 layers (layer_types / max_window_layers) is not supported: every layer or none"),
    (lambda c: c.update(model_type="qwen2", use_sliding_window=True, layer_types=["full_attention"]),
     "layer_types must list sliding_attention or full_attention for each of the 2 layers"),
    (lambda c: c.update(model_type="qwen2", use_sliding_window=True, layer_types=[{}, {}]),
     "layer_types must list sliding_attention or full_attention for each of the 2 layers"),
    (lambda c: c["tscompile"].update(format_version=7), "tscompile.format_version 7 is not supported"),
    (lambda c: c["tscompile"]["layers"].pop(), "tscompile.layers must list 2 layers"),
    (lambda c: c["tscompile"]["layers"][1].update(activation="gelu"), "tscompile.layers[1].activation: 'gelu'"),
    (lambda c: c["tscompile"]["layers"][0].update(mode="fast"), "tscompile.layers[0].mode: 'fast'"),
    (lambda c: c["tscompile"]["layers"][0].update(speed=3), "tscompile.layers[0]: unknown key 'speed'"),
    (lambda c: c.update(rope_scaling="linear"), "rope_scaling must be a mapping or null, got 'linear'"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear"}), "rope_scaling linear needs factor as a positive "
                                                               "number, got None"),
    (lambda c: c["tscompile"]["layers"][0].update(threshold="0.1"), "tscompile.layers[0].threshold: must be a "
                                                                     "number >= 0, got '0.1'"),
    (lambda c: c["tscompile"]["layers"][1].update(stats={"sparsity": "high"}), "tscompile.layers[1].stats.sparsity: "
                                                                               "must be a number in [0, 1]"),
    (lambda c: c["tscompile"]["layers"][0].update(predictor={"rank": "8"}), "tscompile.layers[0].predictor: needs "
                                                                             "rank > 0"),
])
def test_bad_config(tmp_path, edit, expect):
    path = saved(tmp_path)
    edit_config(path, edit)
    msg = load_error(path)
    assert str(path / "config.json") in msg and expect in msg


def test_annotation_predictor_shape_checked(tmp_path):
    ir = add_random_predictors(make_tiny_ir("llama"), rank=4)
    path = saved(tmp_path, ir)
    edit_config(path, lambda c: c["tscompile"]["layers"][0]["predictor"].update(rank=5))
    fc1, _ = predictor_names(0)
    assert f"tensor {fc1} has shape (4, 64), expected (5, 64)" in load_error(path)


def test_annotation_defaults():
    ann = FFNSparsity.from_json({"activation": "relu"}, "x")
    assert (ann.threshold, ann.mode, ann.predictor) == (0.0, "dense", None)
    ann = FFNSparsity.from_json({"activation": "drelu", "predictor": {"rank": 3}}, "x")
    assert ann.predictor == Predictor(rank=3, threshold=0.0, relu=True)


def test_save_a_loaded_checkpoint_over_itself(tmp_path):
    ir = annotated_ir("mistral")
    path = saved(tmp_path, ir, shard_bytes=40_000)
    lazy = load_checkpoint(path)                     # memory-mapped from the files about to be replaced
    lazy.save(path)
    assert (path / "model.safetensors").exists() and not list(path.glob("model-*"))
    assert load_checkpoint(path).content_hash() == lazy.content_hash() == ir.content_hash()


def test_plan_shards():
    from tscompile.checkpoint import plan_shards
    assert plan_shards({"b": 5, "a": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards({}, 10) == [[]]


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.update(tscompile=[1]), "config.json: tscompile: expected an object"),
    (lambda c: c["tscompile"].update(meta="x"), "config.json: tscompile.meta: expected an object"),
    (lambda c: c["tscompile"].update(layers=[1, 2]), "config.json: tscompile.layers[0]: expected an object"),
    (lambda c: c["tscompile"]["layers"][1].update(experts=[]),
     "config.json: tscompile.layers[1].experts: not allowed (the model has no experts)"),
])
def test_malformed_tscompile_section(tmp_path, edit, expect):
    path = saved(tmp_path)
    edit_config(path, edit)
    assert load_error(path) == f"{path}/{expect}"


@pytest.mark.parametrize("experts", [5, [1, 2], [{"activation": "relu"}], None])
def test_malformed_expert_annotations(tmp_path, experts):
    path = saved(tmp_path, make_tiny_ir("mixtral", experts=2, top_k=2))
    edit_config(path, lambda c: c["tscompile"]["layers"][0].update(experts=experts))
    assert load_error(path) == f"{path}/config.json: tscompile.layers[0].experts: expected a list of 2 objects"


def with_header(data: bytes, edit) -> bytes:
    """The file with its header replaced by edit(header) (a new header size)."""
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("corrupt,expect", [   # what the safetensors reader refuses (it raised, exit 3)
    (lambda data: data + bytes(16), "16 bytes after the last tensor's data"),
    (lambda data: with_header(data, lambda h: h | {"__metadata__": {"format": 1}}),
     "corrupt safetensors header (__metadata__ must map names to strings)"),
    (lambda data: with_header(data, lambda h: h | {"extra": h[DOWN]}), "overlaps another tensor's"),
])
def test_safetensors_data_must_tile_the_file(tmp_path, corrupt, expect):
    path = saved(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    msg = load_error(path)
    assert msg.startswith(f"{f}: ") and expect in msg


def test_unhashable_dtype_in_a_safetensors_header(tmp_path):
    path = saved(tmp_path)
    f = path / "model.safetensors"
    edit_down_header(f, "dtype", [32])   # a list: unhashable
    assert load_error(path) == f"{f}: tensor {DOWN}: unsupported dtype [32]"


@pytest.mark.parametrize("make", [
    lambda out: (out.mkdir(), (out / "notes.txt").write_text("precious")),
    lambda out: out.write_text("precious"),
    lambda out: (out.mkdir(), (out / "config.json").write_text('{"model_type": "llama"}')),   # an HF dir
])
def test_save_refuses_to_replace_what_is_not_a_sparse_checkpoint(tmp_path, make):
    out = tmp_path / "victim"
    make(out)
    before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    with pytest.raises(UserError) as e:
        make_tiny_ir("llama").save(out)
    assert str(e.value) == f"{out}: exists and is not a tscompile checkpoint (refusing to replace it)"
    assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]        # no temp dir left behind


def test_save_into_an_empty_dir_and_over_a_sparse_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    monkeypatch.chdir(out)
    make_tiny_ir("llama", seed=1).save(".")                       # `--out .` in an empty directory
    assert load_checkpoint(out).content_hash() == make_tiny_ir("llama", seed=1).content_hash()
    make_tiny_ir("llama", seed=2).save(out)
    assert load_checkpoint(out).content_hash() == make_tiny_ir("llama", seed=2).content_hash()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_killed_save_leaves_a_temp_dir_that_the_next_save_beside_it_removes(tmp_path, killed_at_rename):
    killed_at_rename(f"from tscompile.tiny import make_tiny_ir\nmake_tiny_ir('llama').save({str(tmp_path / 'm')!r})\n")
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()      # the temp dir, complete
    make_tiny_ir("llama").save(tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        path = saved(tmp_path, shard_bytes=40_000)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == \
        dict.fromkeys([p.name for p in path.iterdir()], 0o644)
    assert len(list(path.glob("model-*.safetensors"))) > 1


def test_a_bos_list_keeps_its_first_id_and_an_eos_list_every_id(tmp_path):   # HF configs may list several
    path = saved(tmp_path)
    edit_config(path, lambda c: c.update(bos_token_id=[1, 2], eos_token_id=[2, 1]))
    cfg = ModelIR.load(path).config
    assert (cfg.bos_token_id, cfg.eos_ids) == (1, (2, 1))
    edit_config(path, lambda c: c.update(eos_token_id=[7]))
    assert ModelIR.load(path).config.eos_token_id == 7


def test_generation_config_adds_its_eos_ids(tmp_path):   # Llama-3 instruct lists <|eot_id|> there only
    path = saved(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2, 9]}))
    assert ModelIR.load(path).config.eos_ids == (2, 5, 9)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(UserError, match=r"generation_config.json: eos_token_id 1000000 is outside the vocabulary"):
        ModelIR.load(path)


def test_a_null_flag_reads_as_false(tmp_path):
    path = saved(tmp_path)
    edit_config(path, lambda c: c.update(attention_bias=None, tie_word_embeddings=None))
    cfg = ModelIR.load(path).config
    assert (cfg.attention_bias, cfg.tie_word_embeddings) == (False, False)
