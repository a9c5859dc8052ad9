"""Start, wait for and stop ``bentoml serve`` on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, log: Path) -> subprocess.Popen:
    """``bentoml serve cotgen.serve.service:Cotgen --port PORT`` in the repository root,
    its output in ``log``, in a process group of its own (see :func:`stop_server`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "cotgen.serve.service:Cotgen", "--port", str(port)],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Poll ``url/readyz`` until it answers 200; return the seconds it took.

    Raises:
        RuntimeError: the server exited, or was not ready within ``timeout`` seconds
            (the message ends with the log's tail).
    """
    import httpx

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited ({proc.returncode}); log {log}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"bentoml serve not ready after {timeout:.0f} s; log {log}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (SIGKILL after 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class Server:
    """A running ``bentoml serve``: its base URL, process and start-up time."""

    url: str
    proc: subprocess.Popen
    ready_seconds: float


@contextmanager
def serving(env: dict, log: Path, timeout: float) -> Iterator[Server]:
    """:func:`start_server` on a :func:`free_port`, :func:`wait_ready`, then yield the
    :class:`Server`; :func:`stop_server` on the way out, start-up failures included.

    Raises:
        RuntimeError: see :func:`wait_ready` (the message ends with the log's tail).
    """
    port = free_port()
    proc = start_server(env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        yield Server(url, proc, wait_ready(proc, url, log, timeout))
    finally:
        stop_server(proc)
