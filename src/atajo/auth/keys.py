"""API key → principal. Fails closed: when any key is configured, every request needs a valid one.

Keys are held only as SHA-256 digests, so a memory dump or a log line never holds a usable secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from atajo.core.context import Principal
from atajo.errors import AuthenticationFailed
from atajo.settings import AuthSettings


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return headers.get("api-key") or headers.get("x-api-key") or None


class KeyRing:
    """Digest → principal, built once from settings."""

    def __init__(self, settings: AuthSettings) -> None:
        self._by_digest: dict[str, Principal] = {}
        for key in settings.keys:
            secret = key.key.get_secret_value() if key.key else None
            self._by_digest[digest(secret) if secret else str(key.key_sha256)] = Principal(key.name, tenant=key.tenant)
        if settings.master_key:
            self._by_digest[digest(settings.master_key.get_secret_value())] = Principal("master", is_admin=True)

    @property
    def open(self) -> bool:
        """No key configured: the gateway is open (local use); say so at start-up."""
        return not self._by_digest

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """Async because later key stores (database, Redis) are; this one answers from memory."""
        return self.lookup(headers)

    def lookup(self, headers: Mapping[str, str]) -> Principal:
        if self.open:
            return Principal("anonymous")
        key = presented_key(headers)
        if key is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        principal = self._by_digest.get(digest(key))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal
