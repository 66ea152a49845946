"""Generate the CUDA source of a decode step for one model shape and compile it into a shared library.

The source comes from templates/ffn.cu.j2 (predictor, sparse FFN) and, when the shape names the attention
heads, templates/decode.cu.j2 (GEMV with the RMSNorm folded in, fused rope + cache write + split-KV attention);
every size is a compile-time constant. Compiled libraries are cached
by the hash of (source, arch, nvcc version) under the tscompile cache dir, so a benchmark or a second build of
the same shape does not pay nvcc again.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tscompile.cache import atomic_file
from tscompile.errors import UserError
from tscompile.importers import cache_root

ACTIVATION_ENUM = {"swiglu": 0, "geglu": 1, "relu": 2, "drelu": 3}
DTYPES = {  # dtype name -> (C type, header, packed pair type, pair -> float2, 2 floats -> pair)
    "bfloat16": ("__nv_bfloat16", "cuda_bf16.h", "__nv_bfloat162", "__bfloat1622float2", "__floats2bfloat162_rn"),
    "float16": ("__half", "cuda_fp16.h", "__half2", "__half22float2", "__floats2half2_rn"),
}
RING_BYTES = 64 * 1024   # shared-memory ring of sparse_ffn; 4 stages of 16 KB beat 6, 8 and 12 at s >= 0.8 (NOTES.md)
BATCHES = (1, 2, 4, 8)
MAX_HIDDEN = 16384   # sparse_ffn's ring (two stages at least) and partial sums fit an sm_80 block's 163 KB at batch 8
MAX_GROUP = 8        # query heads per KV head: decode_attention's static shared memory stays under 48 KB
LIBRARY = "libtscffn.so"


@dataclass(frozen=True)
class KernelShape:
    """What the generated source is specialized for."""
    name: str                      # model name, for the file header
    hidden: int
    inter: int
    dtype: str                     # bfloat16 | float16
    activations: tuple[str, ...]   # kinds used by some FFN, each gets a kernel
    max_rank: int = 0              # largest predictor rank (0: no predictor)
    batches: tuple[int, ...] = BATCHES
    heads: int = 0                 # attention shape of the decode-step kernels (0: FFN kernels only)
    kv_heads: int = 0
    head_dim: int = 0


def check_shape(shape: KernelShape, where: str) -> None:
    if shape.hidden % 8:
        raise UserError(f"{where}: hidden_size {shape.hidden} is not a multiple of 8 (16-byte weight loads)")
    if shape.hidden > MAX_HIDDEN:
        raise UserError(f"{where}: hidden_size {shape.hidden} is larger than the kernels support ({MAX_HIDDEN})")
    if shape.dtype not in DTYPES:
        raise UserError(f"{where}: dtype {shape.dtype!r} is not one of {', '.join(DTYPES)}")
    for a in shape.activations:
        if a not in ACTIVATION_ENUM:
            raise UserError(f"{where}: activation {a!r} is not one of {', '.join(ACTIVATION_ENUM)}")
    if shape.heads:
        hd = shape.head_dim
        if hd < 16 or hd > 256 or hd & (hd - 1):
            raise UserError(f"{where}: head_dim {hd} is not a power of two in [16, 256] (attention kernel)")
        if shape.heads % shape.kv_heads:
            raise UserError(f"{where}: num_heads {shape.heads} is not a multiple of num_kv_heads {shape.kv_heads}")
        if shape.heads // shape.kv_heads > MAX_GROUP:
            raise UserError(f"{where}: {shape.heads // shape.kv_heads} query heads per KV head, the attention kernel "
                            f"takes at most {MAX_GROUP}")


def ffn_launch(hidden: int, batch: int) -> dict:
    """Block shape of sparse_ffn: threads own VPT 16-byte column vectors (x and partial y in registers, so
    fewer columns per thread as the batch grows); the ring holds `stages` steps of two rows each."""
    vecs = hidden // 8
    vpt = max(math.ceil(vecs / 1024), 2 if batch == 1 and vecs >= 256 else 1)
    threads = min(1024, 32 * math.ceil(math.ceil(vecs / vpt) / 32))
    stages = max(2, min(16, RING_BYTES // (2 * vpt * threads * 16)))
    chunk = min(threads, max(16, 64 // batch))   # one id per thread when a chunk starts
    return {"batch": batch, "vpt": vpt, "threads": threads, "chunk": chunk, "stages": stages}


def render_source(shape: KernelShape) -> str:
    import jinja2
    check_shape(shape, shape.name)
    ctype, header, pair, pair_to_f2, floats_to_pair = DTYPES[shape.dtype]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    ffn_variants, predictor_variants = [], []
    for b in shape.batches:
        launch = ffn_launch(shape.hidden, b)
        for act in shape.activations:
            ffn_variants.append(launch | {"act_enum": ACTIVATION_ENUM[act]})
        predictor_variants.append({"batch": b, "vpt": launch["vpt"], "threads": launch["threads"],
                                   "rpb": 2 if b <= 2 else 1,
                                   "rvec_per_lane": max(1, math.ceil(shape.max_rank / 8 / 32)),
                                   "npw": 8})
    gemv_variants = []   # (k, act, y_float): q/k/v and o projections, LM head (fp32 logits), dense gate+up
    exact_variants = []  # the decode runtime's exact-gating FFN (one token)
    if shape.heads:
        exact_variants = [ffn_launch(shape.hidden, 1) | {"act_enum": ACTIVATION_ENUM[a]} for a in shape.activations]
        for k in sorted({shape.hidden, shape.heads * shape.head_dim}):
            gemv_variants.append({"k": k, "act": -1, "y_float": 0})
        gemv_variants.append({"k": shape.hidden, "act": -1, "y_float": 1})
        gemv_variants += [{"k": shape.hidden, "act": ACTIVATION_ENUM[a], "y_float": 0} for a in shape.activations]
    return env.get_template("ffn.cu.j2").render(
        name=shape.name, hidden=shape.hidden, inter=shape.inter, batches=shape.batches, dtype_c=ctype,
        dtype_header=header, pair_c=pair, pair_to_float2=pair_to_f2, floats_to_pair=floats_to_pair,
        max_rank=max(8, shape.max_rank), ffn_variants=ffn_variants, predictor_variants=predictor_variants,
        heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim, gemv_variants=gemv_variants,
        exact_variants=exact_variants)


def nvcc_path() -> str | None:
    """nvcc on PATH, or under CUDA_HOME / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_command(nvcc: str, arch: str, source: Path, out: Path) -> list[str]:
    num = arch.removeprefix("sm_")
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{num},code=sm_{num}",
            "-o", str(out), str(source)]


def device_arch() -> str:
    """nvcc's -arch for the GPU torch sees here (e.g. sm_90)."""
    import torch
    return "sm_{}{}".format(*torch.cuda.get_device_capability())


def compile_library(source: str, arch: str, dest: Path | None = None) -> Path:
    """Compile `source` for `arch` (through the cache) and copy the library to dest/libtscffn.so; without dest,
    return the cached library itself. Raises UserError without nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise UserError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile the cuda target")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(f"{arch}\n{version}\n{source}".encode()).hexdigest()[:32]
    cached = cache_root() / "cuda" / key / LIBRARY
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tsc-nvcc-") as tmp:
            src, lib = Path(tmp) / "ffn.cu", Path(tmp) / LIBRARY
            src.write_text(source)
            proc = subprocess.run(nvcc_command(nvcc, arch, src, lib), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}")
            with atomic_file(cached) as part:
                shutil.copyfile(lib, part)
    if dest is None:
        return cached
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, dest / LIBRARY)
    return dest / LIBRARY
