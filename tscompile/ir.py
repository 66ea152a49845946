"""ModelIR: architecture, lazily loaded weights (HF names), tokenizer, per-layer sparsity annotations.

Saved as an HF-style *sparse checkpoint* (docs/checkpoint-format.md):
  config.json        HF config (loadable by transformers for dense families) + a "tscompile" section
  model.safetensors  HF tensor names (+ model.layers.{i}.mlp.predictor.fc{1,2}.weight), sharded with an index when large
  tokenizer.json     HF tokenizers file
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "mixtral")
ACTIVATIONS = ("swiglu", "geglu", "relu", "drelu")   # FATReLU = relu/drelu with threshold > 0
RELU_KINDS = ("relu", "drelu")                       # act(gate) is exactly zero where gate <= 0
MODES = ("dense", "exact", "predictor")              # how a backend picks the neurons to compute
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
MAX_LAYERS = 10_000                                 # a sanity bound (the largest models have ~100-200)


@dataclass
class ArchConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # {"rope_type": "linear", "factor": f} or llama3-style
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None        # mistral: attend to the last W positions only
    attention_bias: bool = False             # qwen2: bias on q, k, v
    num_experts: int = 0                     # mixtral: experts per layer (0 = dense FFN)
    num_experts_per_tok: int = 0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2   # HF's form: several ids end the text (Llama-3 instruct: 128001, 128009)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generated text, the primary (config.json's first) first."""
        ids = self.eos_token_id
        return tuple(ids) if isinstance(ids, list) else () if ids is None else (ids,)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_hf(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}[self.family]
        d = {
            "architectures": [arch], "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": "float32",
        }
        if self.family in ("mistral", "mixtral", "qwen2"):
            d["sliding_window"] = self.sliding_window
        if self.family == "qwen2":   # the window on every layer or on none
            d["use_sliding_window"] = self.sliding_window is not None
            d["max_window_layers"] = 0 if self.sliding_window is not None else self.num_layers
        if self.family == "llama":
            d["attention_bias"] = self.attention_bias
        if self.is_moe:
            d["num_local_experts"] = self.num_experts
            d["num_experts_per_tok"] = self.num_experts_per_tok
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> "ArchConfig":
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object")
        family = d.get("model_type")
        if family not in FAMILIES:
            raise UserError(f"{where}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        def num(key: str, default: Any = ..., kind: type = int, src: dict = d, label: str = "") -> Any:
            """src[key] as `kind`: an int must be a JSON integer (a bool is not), a float any JSON number."""
            label = label or key
            if key not in src or (src[key] is None and default is not ...):
                if default is ...:
                    raise UserError(f"{where}: missing key {label!r}")
                return default
            v = src[key]
            if not _is_number(v) or (kind is int and v != int(v)):
                raise UserError(f"{where}: {label} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
            return kind(v)

        def flag(key: str) -> bool:
            v = False if d.get(key) is None else d[key]   # absent or null: false
            if not isinstance(v, bool):
                raise UserError(f"{where}: {key} must be true or false, got {v!r}")
            return v

        heads, hidden, layers = num("num_attention_heads"), num("hidden_size"), num("num_hidden_layers")
        # transformers' defaults where a key is absent (an explicit null means none)
        window = num("sliding_window", 4096 if family == "mistral" and "sliding_window" not in d else None)
        if family == "qwen2":
            window = window if flag("use_sliding_window") and _qwen2_windowed(d, layers, where) else None
        if window is not None and window <= 0:
            raise UserError(f"{where}: sliding_window must be positive or null, got {window}")
        theta = 1e6 if family == "mixtral" else 1e4
        rope, scaling = d.get("rope_parameters"), d.get("rope_scaling")
        if rope is not None:   # transformers >= 5 keeps rope_theta and the scaling here
            if not isinstance(rope, dict):
                raise UserError(f"{where}: rope_parameters must be a mapping or null, got {rope!r}")
            theta = num("rope_theta", theta, float, rope, "rope_parameters.rope_theta")
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            scaling = None if scaling.get("rope_type", "default") == "default" else scaling
        else:
            theta = num("rope_theta", theta, float)
        cfg = cls(
            family=family, vocab_size=num("vocab_size"), hidden_size=hidden,
            intermediate_size=num("intermediate_size"), num_layers=layers,
            num_heads=heads, num_kv_heads=num("num_key_value_heads", heads),
            head_dim=num("head_dim", hidden // heads if heads > 0 else 0),
            rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=num("rms_norm_eps", 1e-5 if family == "mixtral" else 1e-6, float),
            tie_word_embeddings=flag("tie_word_embeddings"),
            sliding_window=window, attention_bias=family == "qwen2" or flag("attention_bias"),
            num_experts=num("num_local_experts", 0), num_experts_per_tok=num("num_experts_per_tok", 0),
            max_position_embeddings=num("max_position_embeddings", 4096),
            bos_token_id=_first(d.get("bos_token_id")), eos_token_id=eos_field(d.get("eos_token_id")),
        )
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        """Sizes a decoder can be built from (a bad config must fail here, not deep inside a reshape)."""
        hf_keys = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                   "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                   "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
        for attr, key in hf_keys.items():
            if getattr(self, attr) <= 0:
                raise UserError(f"{where}: {key} must be positive, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"{where}: num_attention_heads ({self.num_heads}) is not a multiple of "
                            f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"{where}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(f"{where}: num_experts_per_tok must be in 1..{self.num_experts}, "
                            f"got {self.num_experts_per_tok}")
        if self.num_layers > MAX_LAYERS:     # per-layer tables are built before any tensor is read
            raise UserError(f"{where}: num_hidden_layers {self.num_layers} is implausible (at most {MAX_LAYERS})")
        for key, value in (("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{where}: {key} must be a positive finite number, got {value}")
        for key in ("bos_token_id", "eos_token_id"):
            ids = getattr(self, key)
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and not (type(i) is int and 0 <= i < self.vocab_size):
                    raise UserError(f"{where}: {key} {i} is outside the vocabulary (size {self.vocab_size})")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise UserError(f"{where}: rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in (None, "default", "linear", "llama3"):
            raise UserError(f"{where}: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
        needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(kind, ())
        for key in needs:
            v = self.rope_scaling.get(key)
            if not _is_number(v) or v <= 0:
                raise UserError(f"{where}: rope_scaling {kind} needs {key} as a positive number, got {v!r}")


def _qwen2_windowed(d: dict, layers: int, where: str) -> bool:
    """Whether Qwen2's sliding window applies, which transformers decides per layer (`layer_types`, else the
    layers from `max_window_layers` on): every layer or none is supported."""
    types = d.get("layer_types")
    if layers <= 0:   # check() says what is wrong
        return False
    if types is None:
        first = d.get("max_window_layers", 28)
        if not _is_number(first) or first != int(first):
            raise UserError(f"{where}: max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{where}: layer_types must list sliding_attention or full_attention for each of the "
                        f"{layers} layers")
    if len(set(types)) > 1:
        raise UserError(f"{where}: a sliding window on {types.count('sliding_attention')} of {layers} layers "
                        "(layer_types / max_window_layers) is not supported: every layer or none")
    return types[0] == "sliding_attention"


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def eos_field(x):
    """eos_token_id as ArchConfig keeps it (HF's form): a list of one id is the id, an empty list none."""
    return (x[0] if len(x) == 1 else x or None) if isinstance(x, list) else x


@dataclass
class Predictor:
    rank: int
    threshold: float = 0.0      # a neuron is computed iff its logit >= threshold
    relu: bool = True           # fc2(relu(fc1 x)); False = fc2(fc1 x) (Deja Vu's linear predictor)


def exact_row_shares(gate_sparsity: float, sparsity: float) -> tuple[float, float, float]:
    """Shares of the gate, up and down rows exact gating reads per token: the gate fully, up where act(gate) != 0
    (gate_sparsity: the share where it is exactly 0; 0 for SwiGLU and GeGLU), down where h != 0."""
    return 1.0, 1.0 - gate_sparsity, 1.0 - sparsity


@dataclass
class FFNSparsity:
    """Sparsity annotation of one FFN (a layer's MLP, or one expert of an MoE layer)."""
    activation: str = "swiglu"
    threshold: float = 0.0      # neuron j is active iff |act(x Wg)_j * up_j| > threshold (see docs)
    mode: str = "dense"         # dense | exact (gate computed densely) | predictor
    predictor: Predictor | None = None
    stats: dict[str, Any] = field(default_factory=dict)   # sparsity, frequency summary, recall, ...

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "FFNSparsity":
        d = dict(d)
        if d.get("activation") not in ACTIVATIONS:
            raise UserError(f"{where}.activation: {d.get('activation')!r} is not one of {', '.join(ACTIVATIONS)}")
        if d.get("mode", "dense") not in MODES:
            raise UserError(f"{where}.mode: {d.get('mode')!r} is not one of {', '.join(MODES)}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(LayerSparsity)})
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}")
        pred = d.pop("predictor", None)
        try:
            out = cls(**{k: v for k, v in d.items() if k != "experts"})
            out.predictor = Predictor(**pred) if pred else None
        except TypeError as e:
            raise UserError(f"{where}: {e}") from None
        if not _is_number(out.threshold) or out.threshold < 0:
            raise UserError(f"{where}.threshold: must be a number >= 0, got {out.threshold!r}")
        if not isinstance(out.stats, dict):
            raise UserError(f"{where}.stats: must be a mapping, got {out.stats!r}")
        for key in ("sparsity", "gate_sparsity"):   # what inspect, the report and the backends read
            v = out.stats.get(key)
            if v is not None and not (_is_number(v) and 0 <= v <= 1):
                raise UserError(f"{where}.stats.{key}: must be a number in [0, 1], got {v!r}")
        p = out.predictor
        if p is not None and (isinstance(p.rank, bool) or not isinstance(p.rank, int) or p.rank <= 0
                              or not _is_number(p.threshold) or not isinstance(p.relu, bool)):
            raise UserError(f"{where}.predictor: needs rank > 0, a numeric threshold and relu true/false, got {pred}")
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LayerSparsity(FFNSparsity):
    experts: list[FFNSparsity] | None = None   # MoE: one annotation per expert

    def ffns(self) -> list[FFNSparsity]:
        return self.experts if self.experts is not None else [self]

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        if self.experts is None:
            d.pop("experts")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "LayerSparsity":
        base = FFNSparsity.from_json(d, where)
        out = cls(**dataclasses.asdict(base))
        out.predictor = base.predictor
        if d.get("experts") is not None:
            out.experts = [FFNSparsity.from_json(e, f"{where}.experts[{k}]") for k, e in enumerate(d["experts"])]
        return out


class Weights(Mapping):
    """name -> torch.Tensor, read lazily (memory-mapped) from safetensors files, with in-memory overrides."""

    def __init__(self, files: dict[str, Path] | None = None, tensors: dict[str, Any] | None = None):
        self._files = dict(files or {})      # name -> file holding it
        self._mem = dict(tensors or {})
        self._handles: dict[Path, Any] = {}

    def _handle(self, name):
        from safetensors import SafetensorError, safe_open
        path = self._files[name]
        h = self._handles.get(path)
        if h is None:
            try:
                h = self._handles[path] = safe_open(str(path), framework="pt")
            except SafetensorError as e:   # what read_safetensors_header does not check
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        return h

    def __getitem__(self, name):
        if name in self._mem:
            return self._mem[name]
        if name not in self._files:
            raise KeyError(name)
        return self._handle(name).get_tensor(name)

    def __contains__(self, name) -> bool:   # Mapping's default would read the tensor
        return name in self._mem or name in self._files

    def info(self, name) -> tuple[tuple[int, ...], int]:
        """(shape, bytes per element) of a tensor, without reading its data."""
        if name in self._mem:
            t = self._mem[name]
            return tuple(t.shape), t.element_size()
        if name not in self._files:
            raise KeyError(name)
        from .checkpoint import ST_DTYPES
        sl = self._handle(name).get_slice(name)
        return tuple(sl.get_shape()), ST_DTYPES[sl.get_dtype()]

    def __setitem__(self, name, tensor):
        self._mem[name] = tensor
        self._files.pop(name, None)

    def __delitem__(self, name):
        self._mem.pop(name, None)
        self._files.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        yield from self._mem
        yield from (k for k in self._files if k not in self._mem)

    def __len__(self):
        return len(set(self._mem) | set(self._files))

    def copy(self) -> "Weights":
        return Weights(self._files, self._mem)


def ffn_prefix(layer: int, expert: int | None = None) -> str:
    """HF name prefix of one FFN: the dense MLP, or one Mixtral expert."""
    if expert is None:
        return f"model.layers.{layer}.mlp"
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}"


def check_float16_range(a, name: str, target: str, instead: str = "float32") -> None:
    """For a target that stores tensor `name` (torch or numpy) in float16: a value beyond its range would become
    inf there and the outputs NaN, so a UserError names the tensor and the dtype to use instead."""
    peak = max(float(a.max()), -float(a.min())) if 0 not in a.shape else 0.0   # no |a| copy of a big tensor
    if not peak <= 65504.0:
        raise UserError(f"{target}: tensor {name} holds {peak:g}, beyond float16's range (65504); use dtype "
                        f"{instead} for this target")


def ffn_label(layer: int, expert: int | None = None) -> str:
    """How messages name one FFN: "layer 3", or "layer 3 expert 5"."""
    return f"layer {layer}" + (f" expert {expert}" if expert is not None else "")


def ffn_names(layer: int, expert: int | None = None) -> tuple[str, str, str]:
    """(gate, up, down) weight names. Shapes: gate/up [inter, hidden], down [hidden, inter] (HF layout)."""
    p = ffn_prefix(layer, expert)
    if expert is None:
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"
    return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"   # Mixtral: w1 gate, w3 up, w2 down


def predictor_names(layer: int, expert: int | None = None) -> tuple[str, str]:
    """(fc1 [rank, hidden], fc2 [inter, rank])."""
    p = ffn_prefix(layer, expert)
    return f"{p}.predictor.fc1.weight", f"{p}.predictor.fc2.weight"


@dataclass
class ModelIR:
    config: ArchConfig
    weights: Weights
    tokenizer_json: str | None = None
    layers: list[LayerSparsity] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)   # provenance: source, passes applied

    def __post_init__(self):
        if not self.layers:
            self.layers = [self.default_layer() for _ in range(self.config.num_layers)]

    def default_layer(self) -> LayerSparsity:
        if self.config.is_moe:
            return LayerSparsity(experts=[FFNSparsity() for _ in range(self.config.num_experts)])
        return LayerSparsity()

    def ffn_units(self) -> Iterator[tuple[int, int | None, FFNSparsity]]:
        """Every FFN of the model: (layer, expert or None, its annotation)."""
        for i, layer in enumerate(self.layers):
            if layer.experts is None:
                yield i, None, layer
            else:
                for e, ann in enumerate(layer.experts):
                    yield i, e, ann

    def clone(self) -> "ModelIR":
        """A copy whose annotations and weight table can be changed without touching this one."""
        return ModelIR(self.config, self.weights.copy(), self.tokenizer_json,
                       copy.deepcopy(self.layers), copy.deepcopy(self.meta))

    # ---- sparse checkpoint ---------------------------------------------------------------------

    def config_json(self) -> dict[str, Any]:
        d = self.config.to_hf()
        d["tscompile"] = {"format_version": FORMAT_VERSION,
                          "layers": [layer.to_json() for layer in self.layers], "meta": self.meta}
        return d

    def save(self, out: str | os.PathLike, shard_bytes: int = SHARD_BYTES) -> None:
        """Write the sparse checkpoint into `out` (which must not hold another checkpoint's shards)."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self, Path(out), shard_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelIR":
        from .checkpoint import load_checkpoint
        return load_checkpoint(Path(path))

    def display_name(self) -> str:
        """The model's name for headers of generated source files: meta name or source (a user's path), with
        every character that could end a comment or a line (newline, `*/`, backslash, quotes) made `_`."""
        return re.sub(r"[^\w.:@+=/-]", "_", str(self.meta.get("name") or self.meta.get("source", "model")))

    def content_hash(self) -> str:
        """sha256 over config, annotations, tokenizer and every tensor's dtype, shape and bytes."""
        import torch
        h = hashlib.sha256()
        h.update(json.dumps(self.config_json(), sort_keys=True, default=str).encode())
        h.update((self.tokenizer_json or "").encode())
        for name in sorted(self.weights):
            t = self.weights[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
