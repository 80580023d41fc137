"""OpenAI-compatible HTTP server: `dsv3 serve`, or create_app(engine, name) under any ASGI server."""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so the server's pure helpers (reasoning, tool parsers) import without FastAPI installed.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
