"""API keys: bearer tokens, each belonging to one tenant, stored only as sha256 hashes.

    distillery keys create --tenant acme     # prints the key once

A key is ``dk_`` + 32 random URL-safe bytes; Redis maps ``sha256(key)`` to the tenant
(hash ``distillery:apikeys``), so a copy of the database does not reveal usable keys.
A plain sha256 (no salt, no slow hash) suits random 256-bit tokens: there is nothing to
brute-force, unlike a password.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import redis

KEYS_HASH = "distillery:apikeys"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(conn: redis.Redis, tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError("tenant: 1-64 letters, digits, '_', '.', '-' (starting alphanumeric)")
    key = "dk_" + secrets.token_urlsafe(32)
    conn.hset(KEYS_HASH, hash_key(key), tenant)
    return key


def add_key(conn: redis.Redis, key: str, tenant: str) -> None:
    """Register an existing key (``distillery up`` re-registers its local key on start)."""
    conn.hset(KEYS_HASH, hash_key(key), tenant)


def tenant_for(conn: redis.Redis, key: str) -> str | None:
    t = conn.hget(KEYS_HASH, hash_key(key))
    return t.decode() if isinstance(t, bytes) else t


def revoke_key(conn: redis.Redis, key: str) -> bool:
    return bool(conn.hdel(KEYS_HASH, hash_key(key)))
