"""API key → principal. Fails closed: when any key is configured, every request needs a valid one.

Keys are held only as SHA-256 digests, so a memory dump or a log line never holds a usable secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from atajo.auth.virtual import VirtualKeys
from atajo.core.context import Principal
from atajo.errors import AuthenticationFailed
from atajo.settings import AuthSettings, RateLimit


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return headers.get("api-key") or headers.get("x-api-key") or None


class KeyRing:
    """Digest → principal: the static keys from settings (in memory), then the virtual keys (``VirtualKeys``,
    from the key store, cached)."""

    def __init__(
        self,
        settings: AuthSettings,
        virtual: VirtualKeys | None = None,
        tenant_limits: Mapping[str, RateLimit] | None = None,
    ) -> None:
        self._by_digest: dict[str, Principal] = {}
        self.virtual = virtual
        tenants = tenant_limits or {}
        for key in settings.keys:
            secret = key.key.get_secret_value() if key.key else None
            self._by_digest[digest(secret) if secret else str(key.key_sha256)] = Principal(
                key.name,
                tenant=key.tenant,
                models=frozenset(key.models) if key.models is not None else None,
                limits=key.limits,
                tenant_limits=tenants.get(key.tenant),
                cache=key.cache,
                trust=key.trust,
            )
        if settings.master_key:
            self._by_digest[digest(settings.master_key.get_secret_value())] = Principal("master", is_admin=True)

    @property
    def open(self) -> bool:
        """No key configured: the gateway is open (local use); say so at start-up."""
        return not self._by_digest and self.virtual is None

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if self.open:
            return Principal("anonymous")
        key = presented_key(headers)
        if key is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        hashed = digest(key)
        principal = self._by_digest.get(hashed)
        if principal is None and self.virtual is not None:
            principal = await self.virtual.lookup(hashed)
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal
