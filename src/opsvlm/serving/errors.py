"""Why a request (or one clip of it) cannot be served: :class:`ServingError`, and the 503s that shed load.

Every problem a request can have travels as a :class:`ServingError` (raised, or returned as one clip's outcome in a
batch): an HTTP status, a short machine-readable ``reason`` and a ``detail`` that names the field or file. Errors
that mean "come back later" (overload, a deadline, an unavailable model) carry ``retry_after_s``, sent as the
``Retry-After`` header.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_RETRY_AFTER_S", "ServingError", "overloaded", "unavailable"]

DEFAULT_RETRY_AFTER_S = 2.0


class ServingError(Exception):
    """A request (or one clip of it) that cannot be served.

    Args:
        status: HTTP status code.
        reason: Short machine-readable code (``upload_too_large``, ``not_a_video``, ...).
        detail: Human-readable message naming the problem (the field, or the client's file name; never a server path).
        retry_after_s: For 503s: when the client may retry (the ``Retry-After`` header); ``None`` for none.
    """

    def __init__(self, status: int, reason: str, detail: str, retry_after_s: float | None = None):
        # Every argument in args so the exception pickles (it crosses Ray process boundaries).
        super().__init__(status, reason, detail, retry_after_s)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        """The response body: ``{"error": reason, "detail": detail}``."""
        return {"error": self.reason, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        """Response headers: ``Retry-After`` (whole seconds, rounded up) when the error has one."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ServingError) and self.args == other.args

    def __hash__(self) -> int:
        return hash(self.args)


def overloaded(detail: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S, reason: str = "overloaded") -> ServingError:
    """A 503 that sheds load: a queue is full or the request's deadline passed before its turn came."""
    return ServingError(503, reason, detail, retry_after_s)


def unavailable(detail: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> ServingError:
    """A 503 for a backend (model replica, decoder) that cannot be reached or has no model to serve."""
    return ServingError(503, "model_unavailable", detail, retry_after_s)
