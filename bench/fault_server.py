"""Helpers the server fault campaigns share (bench/fault_kill9.py, fault_soak.py, fault_schemathesis.py):
a tiny synthetic model, a `kt serve` subprocess on 127.0.0.1 and its /metrics, an independent check
of the prefix cache's disk-tier entries, and one greedy completion request."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512)
SUFFIX, MAGIC = ".ktkv", b"KTKV"
WIN = sys.platform == "win32"
MODEL_ID = "m"  # server.model_id: the name the campaigns send as "model"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---- shared helpers ------------------------------------------------------------------------
def make_model(folder: Path) -> Path:
    """A tiny synthetic qwen3-moe checkpoint (2 layers, hidden 64, real tokenizer)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kt_core.models.synthetic import synthesize

    synthesize(folder, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=64)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m kt_core.cli serve` in a subprocess on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, model: Path, cache: Path, log: Path, *overrides: str, context: int = 256) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "kt_core.cli", "serve", f"model.path={model}", "model.dtype=float32",
               f"model.max_seq_len={context}", "server.host=127.0.0.1", f"server.port={self.port}",
               f"server.prefix_disk_dir={cache}", f"server.model_id={MODEL_ID}", *overrides]
        env = dict(os.environ, KT_API_KEY="", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self._out = open(log, "ab")
        kw = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WIN else {}
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), **kw)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until /health answered 200; raises if the process died or never came up."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kt serve exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"kt serve did not come up within {timeout:.0f} s; see {self.log}")

    def metrics(self, timeout: float = 10.0) -> dict:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=timeout).text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def interrupt(self) -> None:
        """Ask for a graceful stop (Ctrl+C): drain, flush the prefix cache, exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.CTRL_BREAK_EVENT if WIN else signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL on POSIX, TerminateProcess on Windows: no handler, no flush, no cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()

    def stop(self, timeout: float = 90.0) -> Optional[int]:
        """Graceful stop; killed if it does not exit within ``timeout``. Returns the exit code."""
        self.interrupt()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        return rc


def check_entry(path: Path, model: Optional[str] = None) -> Optional[str]:
    """An independent check of one disk-tier entry file; None when it is whole, self-consistent
    and (given ``model``, the fingerprint in its header) written for that model."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc}"
    if len(data) < 8 or data[:4] != MAGIC:
        return "bad magic"
    n = struct.unpack("<I", data[4:8])[0]
    try:
        head = json.loads(data[8:8 + n])
    except ValueError:
        return "bad header"
    payload = data[8 + n:]
    if not isinstance(head, dict) or head.get("hash") != path.stem:
        return "header names another block"
    if len(payload) != head.get("payload_bytes"):
        return f"truncated ({len(payload)} of {head.get('payload_bytes')} bytes)"
    if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
        return "checksum mismatch"
    if model is not None and head.get("model") != model:
        return "written for another model"
    return None


def entry_model(cache: Path) -> Optional[str]:
    """The model fingerprint in the header of an entry the server wrote (the first sound one)."""
    for f in sorted(cache.glob(f"*{SUFFIX}")):
        if check_entry(f) is None:
            data = f.read_bytes()
            return json.loads(data[8:8 + struct.unpack("<I", data[4:8])[0]])["model"]
    return None


def entries(cache: Path) -> set:
    return {f.stem for f in cache.glob(f"*{SUFFIX}")}


def temp_files(cache: Path) -> list:
    return sorted(f.name for f in cache.glob("*.tmp"))


def complete(client, url: str, prompt: list, max_tokens: int) -> str:
    r = client.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, "ignore_eos": True})
    if r.status_code != 200:
        raise HttpStatus(r.status_code, r.text[:300])
    return r.json()["choices"][0]["text"]


class HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
