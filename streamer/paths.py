from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Where streamer keeps downloads and generated files: ``$STREAMER_CACHE`` or ``~/.cache/streamer``."""
    root = os.environ.get("STREAMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "streamer"
    )
    return Path(root)
