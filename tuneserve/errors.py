"""Errors that finish one request, and the one that ends the engine.

The engine loop owns every failure (DESIGN.md, failure isolation): an exception that can be pinned to one
request finishes that request with a RequestError; one that cannot fails the step's requests and resets
the engine; only a failed reset is an EngineFatalError.
"""

from __future__ import annotations


class RequestError(Exception):
    """Why one request ended in error: an HTTP-style status (4xx: the input's fault, else 500), a message
    for the client, and the engine phase where it happened (the `kind` of engine_errors_total)."""

    def __init__(self, message: str, status: int = 500, kind: str = "request") -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind

    @classmethod
    def from_exception(cls, e: BaseException, kind: str) -> RequestError:
        """A RequestError for an exception raised while working on one request in phase `kind`."""
        if isinstance(e, RequestError):
            return e
        if isinstance(e, GrammarError):
            return cls(str(e), 400, kind)
        status = 400 if isinstance(e, ValueError) and kind in ("prepare", "submit") else 500
        return cls(f"the engine failed this request while in {kind}: {type(e).__name__}: {e}", status, kind)


class GrammarError(ValueError):
    """A constrained request's grammar cannot go on while decoding (the grammar backend gave up on it: a
    schema with no finite instance, one too complex to follow): the request's schema or grammar is at fault,
    so the request ends with a 400, not a 500."""


class EngineFatalError(RuntimeError):
    """Recovery from a failed step failed too: the engine cannot go on and the process must restart."""
