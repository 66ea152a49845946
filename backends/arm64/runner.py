"""Running an arm64 artifact: natively on arm64 hosts, under qemu-aarch64 elsewhere, or the host build.

Speed figures never come from qemu (emulation time says nothing about a phone): decode_tokens_per_second
times the native binary on arm64 hosts and the x86_64 host build (scalar kernels) elsewhere.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tscompile.cache import load_manifest
from tscompile.errors import UserError

from .build import is_arm64_host, qemu_command

WHERE = ("auto", "qemu", "host", "host-asan", "host-tsan")


class Arm64Runner:
    prefill = "stepwise"      # the prompt runs token by token through the same (gated) FFN path
    # decode speed under qemu would time the emulator: it is timed on the host build
    speed_measured_on = ("the native arm64 build" if is_arm64_host() else
                         "the x86_64 host build (scalar kernels), not the aarch64 binary")

    def __init__(self, outdir: Path, dense: bool = False, exact: bool = False, where: str = "auto",
                 cpu: str | None = None, threads: int | None = None, timeout: float = 600.0):
        self.outdir = Path(outdir)
        self.manifest = load_manifest(self.outdir, ("dims",), "arm64")
        if where not in WHERE:
            raise UserError(f"arm64 runner: where={where!r} is not one of {', '.join(WHERE)}")
        self.dense, self.exact, self.where = dense, exact, where
        self.cpu = cpu or self.manifest.get("qemu_cpu", "cortex-a76")
        self.threads = threads or self.manifest.get("threads", 1)
        self.timeout = timeout
        self.vocab = self.manifest["dims"]["vocab"]

    # ---- which binary ----------------------------------------------------------------------

    def command(self, where: str | None = None) -> list[str]:
        """The command prefix that runs tsrun here."""
        where = where or self.where
        bin_dir = self.outdir / "bin"
        if where == "auto":
            where = "qemu" if (bin_dir / "tsrun").exists() and qemu_command(self.cpu) is not None else "host"
        if where == "qemu":
            prefix = qemu_command(self.cpu)
            if prefix is None or not (bin_dir / "tsrun").exists():
                raise UserError(f"{bin_dir / 'tsrun'}: no aarch64 binary or no qemu-aarch64 to run it")
            return prefix + [str(bin_dir / "tsrun")]
        name = "tsrun" if is_arm64_host() and where == "host" else f"tsrun-{where}"
        if not (bin_dir / name).exists():
            raise UserError(f"{bin_dir / name}: not built")
        return [str(bin_dir / name)]

    def run(self, args: list[str], where: str | None = None) -> subprocess.CompletedProcess:
        flags = ["--threads", str(self.threads)]
        flags += ["--dense"] if self.dense else ["--exact"] if self.exact else []
        cmd = self.command(where) + [str(self.outdir / "weights.bin")] + flags + args
        try:
            res = subprocess.run(cmd, check=False, capture_output=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"tsrun timed out after {self.timeout:.0f} s: {' '.join(cmd)}") from None
        except OSError as e:   # E2BIG: a prompt of tens of thousands of ids is past the kernel's argument limit
            raise UserError(f"tsrun could not start ({e.strerror}): {' '.join(cmd[:3])} ...") from None
        if res.returncode != 0:
            msg = res.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {res.returncode}"]
            raise UserError(f"tsrun failed ({' '.join(cmd[:3])} ...): {msg[-1]}")
        return res

    # ---- Runner contract --------------------------------------------------------------------

    def logits(self, prompt_ids: list[int], forced_ids: list[int]) -> np.ndarray:
        """float32 [1 + len(forced_ids), vocab]: after the prompt, then after each forced token."""
        with tempfile.TemporaryDirectory(prefix="tsrun-") as tmp:
            dump = Path(tmp) / "logits.f32"
            args = ["--prompt-ids", _ids(prompt_ids), "--dump-logits", str(dump)]
            if forced_ids:
                args += ["--force-ids", _ids(forced_ids)]
            else:
                args += ["--steps", "1", "--print-ids"]
            self.run(args)
            out = np.fromfile(dump, dtype="<f4")
        rows = 1 + len(forced_ids)
        if out.size != rows * self.vocab:
            raise UserError(f"tsrun wrote {out.size} logits, expected {rows} x {self.vocab}")
        return out.reshape(rows, self.vocab)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        if max_new_tokens <= 0:
            return []
        res = self.run(["--prompt-ids", _ids(prompt_ids), "--steps", str(max_new_tokens), "--print-ids",
                        "--ignore-eos"])
        return [int(t) for t in res.stdout.decode().strip().split(",") if t]

    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> str:
        """Text in, continuation text out (tokenizer.bin), stopping at EOS."""
        res = self.run(["--prompt", prompt, "--steps", str(max_new_tokens), "--temperature", str(temperature),
                        "--top-p", str(top_p), "--seed", str(seed)])
        return res.stdout.decode(errors="replace").removesuffix("\n")   # tsrun's own; the model's newlines stay

    def decode_tokens_per_second(self, prompt_ids: list[int], n_tokens: int) -> float:
        """Measured inside tsrun around the decode steps, on the native (arm64 host) or x86_64 host build."""
        res = self.run(["--prompt-ids", _ids(prompt_ids), "--steps", str(n_tokens + 1), "--print-ids",
                        "--ignore-eos"], where="host")
        m = re.search(r"decode (\d+) tokens in ([0-9.]+) s", res.stderr.decode())
        if not m or float(m.group(2)) <= 0:
            raise UserError(f"tsrun printed no decode timing: {res.stderr.decode().strip()[-200:]}")
        return int(m.group(1)) / float(m.group(2))


def _ids(ids: list[int]) -> str:
    if not ids:
        raise UserError("arm64 runner: empty token id list")
    return ",".join(str(int(i)) for i in ids)


def load_arm64(outdir: Path, dense: bool = False, **opts) -> Arm64Runner:
    return Arm64Runner(Path(outdir), dense=dense, **opts)
