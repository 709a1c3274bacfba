"""Cache operations over HTTP: ``POST /v1/cache/invalidate``, ``POST /v1/cache/flush``, ``GET /v1/cache/stats``.

Any valid key may invalidate within its own tenant. The master key may name another tenant (``"tenant"``)
or every tenant (``"*"``), and alone may flush or read stats.
"""

from __future__ import annotations

import logging
import re

from atajo.cache.service import CacheService
from atajo.cache.tags import valid_tag
from atajo.core.context import Principal
from atajo.errors import InvalidRequest, PermissionDenied
from atajo.server.edge import Request, Response
from atajo.server.http import Route
from atajo.server.json_api import Authenticate, JsonApi, RequestIdOf
from atajo.server.parse import decode
from atajo.settings import NAME_PATTERN
from atajo.types import JSONObject

_NAME = re.compile(NAME_PATTERN)
MAX_TAGS_PER_CALL = 1000
MAX_BODY = 256 * 1024

log = logging.getLogger("atajo.cache")


class CacheAdmin(JsonApi):
    route = "cache"

    def __init__(self, service: CacheService, authenticate: Authenticate, request_id: RequestIdOf) -> None:
        self.service = service
        self.authenticate = authenticate
        self.request_id = request_id

    def routes(self) -> list[Route]:
        return [
            ("POST", "/v1/cache/invalidate", self.invalidate),
            ("POST", "/v1/cache/flush", self.flush),
            ("GET", "/v1/cache/stats", self.stats),
        ]

    async def invalidate(self, request: Request) -> Response:
        return await self._call(request, self._invalidate)

    async def flush(self, request: Request) -> Response:
        return await self._call(request, self._flush)

    async def stats(self, request: Request) -> Response:
        return await self._call(request, self._stats)

    async def _invalidate(self, principal: Principal, request: Request) -> JSONObject:
        data = await _options(request)
        unknown = sorted(set(data) - {"tags", "namespace", "key_prefix", "tenant"})
        if unknown:
            raise InvalidRequest(
                f"Unknown field '{unknown[0]}' (expected tags, namespace, key_prefix, tenant).", param=unknown[0]
            )
        for name in ("tags", "namespace", "key_prefix", "tenant"):
            if name in data and data[name] is None:
                raise InvalidRequest(f"'{name}' cannot be null; leave it out instead.", param=name)
        tags = data.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidRequest("'tags' must be an array of strings.", param="tags")
        if len(tags) > MAX_TAGS_PER_CALL:
            raise InvalidRequest(f"'tags' may hold at most {MAX_TAGS_PER_CALL} tags.", param="tags")
        for tag in tags:
            if not valid_tag(tag):
                raise InvalidRequest(f"{tag[:40]!r} is not a valid tag.", param="tags")
        namespace = data.get("namespace")
        if namespace is not None and (not isinstance(namespace, str) or not _NAME.match(namespace)):
            raise InvalidRequest("'namespace' must be 1 to 64 letters, digits or any of _ . : -", param="namespace")
        key_prefix = data.get("key_prefix")
        if key_prefix is not None and (not isinstance(key_prefix, str) or not key_prefix or len(key_prefix) > 512):
            raise InvalidRequest(
                "'key_prefix' must be a non-empty string of at most 512 characters.", param="key_prefix"
            )
        if not tags and namespace is None and key_prefix is None:
            raise InvalidRequest("Give tags, a namespace or a key_prefix to invalidate (or use /v1/cache/flush).")
        tenant = _tenant(principal, data)
        result = await self.service.invalidate(tenant, tags=frozenset(tags), namespace=namespace, key_prefix=key_prefix)
        return {
            "object": "cache.invalidation",
            "tenant": tenant if tenant is not None else "*",
            "dropped": result.total,
            "tiers": result.dropped,
            "tags": sorted(result.tags),
        }

    async def _flush(self, principal: Principal, request: Request) -> JSONObject:
        data = await _options(request)
        _admin(principal, "flush the cache")
        unknown = sorted(set(data) - {"tenant"})
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}' (expected tenant).", param=unknown[0])
        if "tenant" in data and data["tenant"] is None:
            raise InvalidRequest("'tenant' cannot be null; leave it out instead.", param="tenant")
        tenant = _tenant(principal, data, default_all=True)
        dropped = await self.service.flush(tenant)
        total = sum(n for n in dropped.values() if n > 0)
        return {"object": "cache.flush", "tenant": tenant or "*", "dropped": total, "tiers": dropped}

    async def _stats(self, principal: Principal, _: Request) -> JSONObject:
        _admin(principal, "read cache stats")
        stats = await self.service.stats()
        tiers = []
        for tier in self.service.chain.tiers:
            s = stats[tier.name]
            tiers.append(
                {
                    "name": tier.name,
                    "ttl_s": tier.ttl_s,
                    "up": not tier.down_until,
                    "entries": s.entries,
                    "bytes": s.bytes,
                    "evictions": s.evictions,
                }
            )
        answer: JSONObject = {"object": "cache.stats", "tiers": tiers}
        semantic = self.service.semantic
        if semantic is not None:
            try:
                answer["semantic"] = {"store": semantic.name, "entries": await semantic.count()}
            except Exception as exc:  # the tiers' figures are still worth answering with
                log.warning("semantic store count failed: %s", type(exc).__name__)
        return answer


async def _options(request: Request) -> JSONObject:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidRequest("The request body is too large for a cache operation.")
    raw = await request.body()
    return decode(raw) if raw else {}  # no body: no options; whitespace is not JSON


def _admin(principal: Principal, what: str) -> None:
    if not principal.is_admin:
        raise PermissionDenied(f"Only the master key may {what}.")


def _tenant(principal: Principal, data: JSONObject, *, default_all: bool = False) -> str | None:
    """The tenant an operation applies to: the key's own, or (master key) the one named, ``*`` for all."""
    named = data.get("tenant")
    if named is None:
        return None if (principal.is_admin and default_all) else principal.tenant
    if not isinstance(named, str) or not (named == "*" or _NAME.match(named)):
        raise InvalidRequest("'tenant' must be a tenant name or '*'.", param="tenant")
    if not principal.is_admin and named != principal.tenant:
        raise PermissionDenied("A key may only invalidate its own tenant's cache; the master key may name another.")
    return None if named == "*" else named
