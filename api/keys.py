"""API keys: bearer tokens, each belonging to one tenant, stored only as sha256 hashes.

    distillery keys create --tenant acme     # prints the key once
    distillery keys create --admin           # an admin key (tenant "admin")
    distillery keys revoke dk_...

A key is ``dk_`` + 32 random URL-safe bytes; Redis maps ``sha256(key)`` to the tenant
(hash ``distillery:apikeys``), so a copy of the database does not reveal usable keys.
An admin key is also in the set ``distillery:apikeys:admin``: it acts as its own tenant
everywhere, and its list routes (jobs, datasets, models) show every tenant's.
A plain sha256 (no salt, no slow hash) suits random 256-bit tokens: there is nothing to
brute-force, unlike a password.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import redis

KEYS_HASH = "distillery:apikeys"
ADMIN_SET = "distillery:apikeys:admin"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(conn: redis.Redis, tenant: str, admin: bool = False) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise ValueError("tenant: 1-64 letters, digits, '_', '.', '-' (starting alphanumeric)")
    key = "dk_" + secrets.token_urlsafe(32)
    p = conn.pipeline()
    p.hset(KEYS_HASH, hash_key(key), tenant)
    if admin:
        p.sadd(ADMIN_SET, hash_key(key))
    p.execute()
    return key


def add_key(conn: redis.Redis, key: str, tenant: str, admin: bool = False) -> None:
    """Register an existing key (``distillery up`` re-registers its local key on start;
    the API registers DISTILLERY_ADMIN_KEY as an admin key)."""
    p = conn.pipeline()
    p.hset(KEYS_HASH, hash_key(key), tenant)
    if admin:
        p.sadd(ADMIN_SET, hash_key(key))
    p.execute()


def lookup(conn: redis.Redis, key: str) -> tuple[str | None, bool]:
    """(tenant, is admin) of a key; (None, False) for a key that is not one."""
    p = conn.pipeline(transaction=False)
    p.hget(KEYS_HASH, hash_key(key))
    p.sismember(ADMIN_SET, hash_key(key))
    return _decode(*p.execute())


async def alookup(aconn, key: str) -> tuple[str | None, bool]:
    """``lookup`` on an asyncio client (the API's auth dependency, on every request)."""
    async with aconn.pipeline(transaction=False) as p:
        p.hget(KEYS_HASH, hash_key(key))
        p.sismember(ADMIN_SET, hash_key(key))
        return _decode(*await p.execute())


def _decode(tenant, admin) -> tuple[str | None, bool]:
    if tenant is None:
        return None, False
    return (tenant.decode() if isinstance(tenant, bytes) else tenant), bool(admin)


def tenant_for(conn: redis.Redis, key: str) -> str | None:
    return lookup(conn, key)[0]


def revoke_key(conn: redis.Redis, key: str) -> bool:
    """Forget a key (its tenant's data stays); False if it was not a key."""
    p = conn.pipeline()
    p.hdel(KEYS_HASH, hash_key(key))
    p.srem(ADMIN_SET, hash_key(key))
    return bool(p.execute()[0])
