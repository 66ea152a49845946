"""Deterministic cost counting under qemu: our TCG plugin (tools/insn_count.c) and how to build and run it.

Debian ships neither a plugin nor `qemu-plugin.h`; the header comes from Debian's qemu *source* package
(matching the installed qemu-user version), fetched once with `apt-get source --download-only` through a
private apt configuration (no change to the system's sources) and cached under the tscompile cache dir.
The header is never committed.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tscompile.cache import atomic_file
from tscompile.errors import UserError
from tscompile.importers import cache_root

PLUGIN_SOURCE = Path(__file__).parent / "tools" / "insn_count.c"
DEBIAN_MIRRORS = (("http://deb.debian.org/debian", "bookworm bookworm-updates"),
                  ("http://deb.debian.org/debian-security", "bookworm-security"))


def qemu_source_version() -> str:
    """The Debian source version of the installed qemu-user (e.g. 1:7.2+dfsg-7+deb12u18)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${source:Version}", "qemu-user"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise UserError("qemu plugin: cannot read the qemu-user package version (dpkg-query)") from None
    return out


def plugin_header() -> Path:
    """Path of qemu-plugin.h for the installed qemu (fetched and cached on first use)."""
    version = qemu_source_version()
    dest = cache_root() / "qemu-plugin" / re.sub(r"[^A-Za-z0-9.+-]", "_", version) / "qemu-plugin.h"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="tscompile-qemu-src-") as tmp:
        tmp = Path(tmp)
        sources = tmp / "deb-src.sources"
        sources.write_text("".join(
            f"Types: deb-src\nURIs: {uri}\nSuites: {suites}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n" for uri, suites in DEBIAN_MIRRORS))
        (tmp / "lists" / "partial").mkdir(parents=True)
        opts = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={tmp / 'lists'}", "-o", "Debug::NoLocking=1", "-qq"]
        dl = tmp / "dl"
        dl.mkdir()
        try:
            subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True)
            subprocess.run(["apt-get", *opts, "source", "--download-only", f"qemu={version}"], check=True,
                           capture_output=True, cwd=dl)
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", b"") or b""
            raise UserError(f"qemu plugin: cannot download Debian's qemu {version} source package: "
                            f"{err.decode(errors='replace').strip()[-200:] or e}") from None
        orig = next(dl.glob("qemu_*.orig.tar.*"), None)
        if orig is None:
            raise UserError(f"qemu plugin: no qemu orig tarball in the source package download ({dl})")
        with tarfile.open(orig) as tar:
            member = next((m for m in tar if m.name.endswith("include/qemu/qemu-plugin.h")), None)
            if member is None:
                raise UserError(f"qemu plugin: {orig.name} holds no include/qemu/qemu-plugin.h")
            data = tar.extractfile(member).read()
    with atomic_file(dest) as part:
        part.write_bytes(data)
    return dest


def build_plugin() -> Path:
    """Compiles tools/insn_count.c into the cache (rebuilt when the source changes)."""
    header = plugin_header()
    src = PLUGIN_SOURCE.read_bytes()
    tag = hashlib.sha256(src + header.read_bytes()).hexdigest()[:16]
    out = header.parent / f"insn_count-{tag}.so"
    if out.exists():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise UserError("qemu plugin: no host C compiler (gcc)")
    with atomic_file(out) as tmp:
        res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-I", str(header.parent), str(PLUGIN_SOURCE),
                              "-o", str(tmp), "-lpthread"], check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"qemu plugin: build failed: {res.stderr.strip()[-300:]}")
    return out


def count(command: list[str], mem_prefixes: tuple[str, ...] = (), cpu: str = "cortex-a76",
          timeout: float = 600.0) -> dict[str, tuple[int, int]]:
    """Runs an aarch64 command under qemu with the plugin: {symbol: (instructions, loaded bytes)}."""
    from .build import QEMU, QEMU_SYSROOT
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise UserError("qemu plugin: qemu-aarch64 not found (apt-get install qemu-user)")
    plugin = build_plugin()
    with tempfile.TemporaryDirectory(prefix="tscompile-count-") as tmp:
        out = Path(tmp) / "counts.tsv"
        args = ",".join([str(plugin), f"out={out}"] + [f"mem={p}" for p in mem_prefixes])
        res = subprocess.run([qemu, "-cpu", cpu, "-L", QEMU_SYSROOT, "-plugin", args, *command],
                             check=False, capture_output=True, timeout=timeout)
        if res.returncode != 0 or not out.exists():
            raise UserError(f"qemu plugin run failed ({res.returncode}): "
                            f"{res.stderr.decode(errors='replace').strip()[-300:]}")
        counts = {}
        for line in out.read_text().splitlines():
            name, insns, loaded = line.rsplit("\t", 2)
            counts[name] = (int(insns), int(loaded))
    return counts
