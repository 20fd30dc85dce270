"""Test helpers for live servers (the implementation lives in tuneserve.server.launch)."""

from tuneserve.server.launch import BackgroundServer as LiveServer
from tuneserve.server.launch import free_port

__all__ = ["LiveServer", "free_port"]
