"""Test helpers for live servers (the implementation lives in tuneserve.server.launch)."""

import subprocess
import time

import httpx

from tuneserve.server.launch import BackgroundServer as LiveServer
from tuneserve.server.launch import free_port

__all__ = ["LiveServer", "free_port", "wait_until_healthy"]


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait for a server process's /health to answer 200 (fails if the process exits or time runs out)."""
    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline and proc.poll() is None, "server did not start"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
