"""The native SparseFFN kernel library: ORT headers, the generated C++ source, the g++ build, its cache.

Headers: `$ORT_INCLUDE_DIR` if set, else `<cache>/ort-headers/<version>/include`, filled once from the npm
package below (`npm pack`, then only the header folder is extracted; the 143 MB archive is deleted). The
library is built once per source text and compiler (cached under `<cache>/onnx-kernels/<hash>/`) and copied
into each artifact as `libtscompile_ort.so`.

Portability: the library is compiled for baseline x86-64 and the row kernels additionally for x86-64-v3
(AVX2+FMA+F16C) and x86-64-v4 (AVX-512) through GCC `target_clones`; the dynamic loader picks the best one on
the machine that runs it, so an artifact built here also runs on an older CPU (no -march=native).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

from tscompile.cache import compiler_version, scratch_dir
from tscompile.errors import UserError
from tscompile.importers import cache_root

from .builder import DOMAIN

HEADERS_PACKAGE = "com.github.asus4.onnxruntime"
HEADERS_VERSION = "0.4.9"  # carries ONNX Runtime 1.29 headers (C API 29; loads in ORT >= 1.29)
HEADERS_IN_PACKAGE = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
LIBRARY_NAME = "libtscompile_ort.so"
SOURCE_NAME = "libtscompile_ort.cpp"
TEMPLATE = "sparse_ffn.cpp.j2"
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
X86_CLONES = (
    '"arch=x86-64-v4", "arch=x86-64-v3", "default"',
    "x86-64-v4 AVX-512, x86-64-v3 AVX2/FMA/F16C, baseline",
)

# C expressions of h = act(g) * u, mirroring tscompile/reference.py
ACTIVATIONS = [
    {"name": "swiglu", "enum": "SWIGLU", "relu": False, "expr": "g / (1.0f + std::exp(-g)) * u"},
    {
        "name": "geglu",
        "enum": "GEGLU",
        "relu": False,
        "expr": "0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u",
    },
    {"name": "relu", "enum": "RELU", "relu": True, "expr": "g > 0.0f ? g * u : 0.0f"},
    {"name": "drelu", "enum": "DRELU", "relu": True, "expr": "g > 0.0f && u > 0.0f ? g * u : 0.0f"},
]
# element type of Wg, Wu, WdT: C type of a stored element and how one becomes a float (%s = the element)
WEIGHT_TYPES = [
    {"onnx": "float", "ctype": "float", "load": "%s"},
    {"onnx": "float16", "ctype": "uint16_t", "load": "half_to_float(%s)"},
]

_warned = False


def render_source() -> str:
    """The C++ source of the kernel library (the same text for every model: it is generic in the sizes)."""
    import jinja2

    from tscompile import __version__

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    x86 = platform.machine() in ("x86_64", "AMD64")
    clones, clone_doc = X86_CLONES if x86 else ("", "one build for the host ISA")
    return env.get_template(TEMPLATE).render(
        version=__version__,
        domain=DOMAIN,
        activations=ACTIVATIONS,
        weight_types=WEIGHT_TYPES,
        clones=clones,
        clone_doc=clone_doc,
    )


def fetched_headers_dir() -> Path:
    """Where ort_include_dir keeps the headers npm fetched."""
    return cache_root() / "ort-headers" / HEADERS_VERSION / "include"


def ort_include_dir() -> tuple[Path | None, str]:
    """(directory holding onnxruntime_c_api.h, or None) and why not when None."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        if (Path(env) / "onnxruntime_c_api.h").is_file():
            return Path(env), ""
        raise UserError(f"ORT_INCLUDE_DIR={env}: no onnxruntime_c_api.h there")
    inc = fetched_headers_dir()
    root = inc.parent
    if (inc / "onnxruntime_c_api.h").is_file():
        return inc, ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed (apt-get install npm) and ORT_INCLUDE_DIR is not set"
    root.mkdir(parents=True, exist_ok=True)
    with scratch_dir(root, "fetch") as tmp:
        # npm pack downloads the package tarball without installing anything
        r = subprocess.run(
            [npm, "pack", f"{HEADERS_PACKAGE}@{HEADERS_VERSION}", "--pack-destination", tmp],
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if r.returncode != 0 or tgz is None:
            return (
                None,
                f"npm pack {HEADERS_PACKAGE}@{HEADERS_VERSION} failed: {r.stderr.strip().splitlines()[-1:]}",
            )
        out = Path(tmp) / "include"
        out.mkdir()
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.startswith(HEADERS_IN_PACKAGE) and m.name.endswith(".h"):
                    (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        if not (out / "onnxruntime_c_api.h").is_file():
            return None, f"{tgz.name} holds no onnxruntime_c_api.h under {HEADERS_IN_PACKAGE}"
        try:
            os.replace(out, inc)
        except OSError:   # another process fetched them meanwhile
            if not (inc / "onnxruntime_c_api.h").is_file():
                raise
    return inc, ""


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def ort_headers_here() -> bool:
    """The ORT C API headers are at hand (fetched earlier, or ORT_INCLUDE_DIR)."""
    return (fetched_headers_dir() / "onnxruntime_c_api.h").is_file() or bool(os.environ.get("ORT_INCLUDE_DIR"))


def native_possible() -> bool:
    """Whether build_library can build here (a C++ compiler, and the ORT headers at hand or npm to fetch them),
    without fetching anything."""
    return bool(cxx_compiler()) and (ort_headers_here() or shutil.which("npm") is not None)


def build_library(outdir: Path, log=None) -> Path | None:
    """Write outdir/libtscompile_ort.{cpp,so}; None (after one warning per process) without headers."""
    global _warned
    cxx = cxx_compiler()
    if cxx and shutil.which(cxx) is None:
        raise UserError(f"CXX={cxx}: no such compiler (unset CXX to use g++)")
    inc, why = ort_include_dir() if cxx else (None, "g++ is not installed")
    if inc is None:
        if not _warned:
            msg = (
                f"onnx: native SparseFFN kernels not built ({why}); the model runs through its function body"
            )
            (log.warning if log else warnings.warn)(msg)
            _warned = True
        return None
    source = render_source()
    (outdir / SOURCE_NAME).write_text(source)
    key = hashlib.sha256(
        "\n".join(
            [source, compiler_version([cxx]), " ".join(CXXFLAGS), (inc / "onnxruntime_c_api.h").read_text()]
        ).encode()
    ).hexdigest()[:16]
    cached = cache_root() / "onnx-kernels" / key / LIBRARY_NAME
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with scratch_dir(cached.parent, "build") as tmp:
            src, lib = Path(tmp) / SOURCE_NAME, Path(tmp) / LIBRARY_NAME
            src.write_text(source)
            r = subprocess.run(
                [cxx, *CXXFLAGS, f"-I{inc}", str(src), "-o", str(lib)],
                check=False,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                first = next((line for line in r.stderr.splitlines() if "error" in line), f"exit status {r.returncode}")
                raise UserError(f"{cxx} failed to build the SparseFFN kernel library (CXX, ORT_INCLUDE_DIR): {first}")
            os.replace(lib, cached)
    shutil.copy2(cached, outdir / LIBRARY_NAME)
    return outdir / LIBRARY_NAME
