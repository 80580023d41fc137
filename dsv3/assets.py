"""Where the embedded default model lives inside the package."""
from __future__ import annotations

import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "default-model")


def default_model_path() -> str:
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR} (a broken install?); reinstall dsv3 or "
            f"pass --model PATH")
    return DEFAULT_MODEL_DIR


def resolve_model(path: str | None) -> str:
    return path if path else default_model_path()
