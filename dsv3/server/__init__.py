"""OpenAI-compatible HTTP server: `dsv3 serve`, or create_app(engine, name) under any ASGI server."""
from .app import create_app

__all__ = ["create_app"]
