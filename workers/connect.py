"""Where the job store is: the Redis every piece (API, workers, CLI) connects to.

``REDIS_URL`` (or ``DISTILLERY_REDIS_URL``) when set, else the URL a running
``distillery up`` wrote to ``$DISTILLERY_HOME/redis/url`` (``api/redis_server.py``
starts that Redis).
"""

from __future__ import annotations

import os
from pathlib import Path

import redis

URL_FILE = "url"


def configured_url(home: Path | None = None) -> str | None:
    """REDIS_URL / DISTILLERY_REDIS_URL, else the URL a running ``distillery up`` wrote."""
    url = os.environ.get("REDIS_URL") or os.environ.get("DISTILLERY_REDIS_URL")
    if url:
        return url
    if home is not None:
        f = home / "redis" / URL_FILE
        if f.is_file():
            url = f.read_text().strip()
            if url and ping(url):
                return url
    return None


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout).ping())
    except redis.RedisError:
        return False
