"""Virtual keys and tenants over HTTP, master key only:

POST   /admin/keys                  create; 201 with the secret, shown this once
GET    /admin/keys[?tenant=…]       list (never a secret: a hint of it)
GET    /admin/keys/{id}             one key, with its effective limits and adaptive multipliers
DELETE /admin/keys/{id}             revoke (every instance within a second)
POST   /admin/keys/{id}/rotate      a new secret for the same key; the old one stops working
POST   /admin/tenants               create a tenant or replace its limits
GET    /admin/tenants[/{name}]      list, or one
GET    /admin/limits                the adaptive multipliers and the limits in force

A key's ``budget_micros`` is its money budget per calendar month (UTC), in millionths of the catalog's
currency, enforced by the budget stage beside the configured budgets (429 ``budget_exceeded`` naming
``key:<id>/month``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from pydantic import ValidationError

from atajo.auth.keys import digest
from atajo.auth.store import KeyRecord, KeyStoreError, TenantRecord
from atajo.auth.virtual import VirtualKeys, hint_of, new_key_id, new_secret
from atajo.core.context import Principal
from atajo.errors import InvalidRequest, NotFound
from atajo.server.edge import Request, Response
from atajo.server.http import Route
from atajo.server.json_api import Authenticate, JsonApi, RequestIdOf
from atajo.server.parse import decode
from atajo.settings import NAME_PATTERN, CachePolicy, RateLimit, Trust
from atajo.types import JSONObject

_NAME = re.compile(NAME_PATTERN)
_MODEL = re.compile(r"^[!-~]{1,256}$")
_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")
MAX_BODY = 64 * 1024
MAX_MODELS = 256
KEY_FIELDS = ("tenant", "name", "models", "limits", "budget_micros", "cache", "trust")

Describe = Callable[[KeyRecord], JSONObject]
"""A key's limits in force and the multipliers applied to them (from the limiter), for ``GET /admin/keys/{id}``."""


class KeysAdmin(JsonApi):
    route = "admin"
    admin_only = "Only the master key may manage keys and tenants."
    store_errors = (KeyStoreError,)
    store_down = "The key store is unavailable; try again shortly."

    def __init__(
        self,
        keys: VirtualKeys,
        authenticate: Authenticate,
        request_id: RequestIdOf,
        *,
        describe_key: Describe | None = None,
        describe_limits: Callable[[], JSONObject] | None = None,
    ) -> None:
        self.keys = keys
        self.store = keys.store
        self.authenticate = authenticate
        self.request_id = request_id
        self.describe_key = describe_key
        self.describe_limits = describe_limits

    def routes(self) -> list[Route]:
        return [
            ("POST", "/admin/keys", self.create_key),
            ("GET", "/admin/keys", self.list_keys),
            ("GET", "/admin/keys/", self.get_key),
            ("DELETE", "/admin/keys/", self.revoke_key),
            ("POST", "/admin/keys/*", self.rotate_key),
            ("POST", "/admin/tenants", self.put_tenant),
            ("GET", "/admin/tenants", self.list_tenants),
            ("GET", "/admin/tenants/", self.get_tenant),
            ("GET", "/admin/limits", self.limits),
        ]

    async def _body(self, request: Request) -> JSONObject:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise InvalidRequest("The request body is too large for an admin operation.")
        return decode(await request.body())

    # --- keys -------------------------------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        return await self._call(request, self._create_key)

    async def _create_key(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        data = await self._body(request)
        unknown = sorted(set(data) - set(KEY_FIELDS))
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}' (expected {', '.join(KEY_FIELDS)}).", param=unknown[0])
        tenant = data.get("tenant")
        if not isinstance(tenant, str) or not _NAME.match(tenant):
            raise InvalidRequest("'tenant' is required: 1 to 64 letters, digits or any of _ . : -", param="tenant")
        name = _optional(data, "name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise InvalidRequest("'name' must be 1 to 64 letters, digits or any of _ . : -", param="name")
        models = _optional(data, "models")
        if models is not None and (
            not isinstance(models, list)
            or len(models) > MAX_MODELS
            or not all(isinstance(m, str) and _MODEL.match(m) for m in models)
        ):
            raise InvalidRequest(f"'models' must be an array of at most {MAX_MODELS} model names.", param="models")
        budget = _integral(_optional(data, "budget_micros"))
        if budget is not None and (type(budget) is not int or not 0 <= budget <= 2**62):
            raise InvalidRequest("'budget_micros' must be a non-negative integer.", param="budget_micros")
        given_trust = _optional(data, "trust")
        trust: Trust = "auto"
        if given_trust in ("trusted", "untrusted"):
            trust = "trusted" if given_trust == "trusted" else "untrusted"
        elif given_trust not in (None, "auto"):
            raise InvalidRequest("'trust' must be auto, trusted or untrusted.", param="trust")
        secret = new_secret()
        record = KeyRecord(
            id=new_key_id(),
            tenant=tenant,
            digest=digest(secret),
            hint=hint_of(secret),
            name=name,
            models=tuple(dict.fromkeys(models)) if models is not None else None,
            limits=_limits(_optional(data, "limits"), "limits"),
            budget_micros=budget,
            cache=_cache_policy(_optional(data, "cache")),
            trust=trust,
        )
        record = await self.store.create_key(record)
        self.keys.forget(record.digest)
        return 201, {**self._key(record), "key": secret}

    async def list_keys(self, request: Request) -> Response:
        return await self._call(request, self._list_keys)

    async def _list_keys(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        query = parse_qs(request.query or "", keep_blank_values=True)
        unknown = sorted(set(query) - {"tenant", "include_revoked"})
        if unknown:
            raise InvalidRequest("Unknown query parameter (expected tenant, include_revoked).", param=unknown[0][:64])
        tenant = query.get("tenant", [None])[-1]
        if tenant is not None and not _NAME.match(tenant):
            raise InvalidRequest("'tenant' must be a tenant name.", param="tenant")
        revoked = query.get("include_revoked", ["false"])[-1]
        if revoked not in ("true", "false"):
            raise InvalidRequest("'include_revoked' must be true or false.", param="include_revoked")
        records = await self.store.list_keys(tenant)
        data = [self._key(r) for r in records if revoked == "true" or not r.revoked]
        return 200, {"object": "list", "data": data}

    async def get_key(self, request: Request) -> Response:
        return await self._call(request, self._get_key)

    async def _get_key(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        record = await self._find(request.path.removeprefix("/admin/keys/"))
        body = self._key(record)
        if self.describe_key is not None and not record.revoked:
            body["effective"] = self.describe_key(record)
        return 200, body

    async def revoke_key(self, request: Request) -> Response:
        return await self._call(request, self._revoke_key)

    async def _revoke_key(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        key_id = request.path.removeprefix("/admin/keys/")
        await self._find(key_id)
        record = await self.store.revoke(key_id)
        if record is None:
            raise _no_key(key_id)
        self.keys.forget(record.digest)
        return 200, self._key(record)

    async def rotate_key(self, request: Request) -> Response:
        return await self._call(request, self._rotate_key)

    async def _rotate_key(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        key_id, _, action = request.path.removeprefix("/admin/keys/").partition("/")
        if action != "rotate" or not key_id:
            raise NotFound(f"Unknown request URL: POST {request.path}.")
        old = await self._find(key_id)
        secret = new_secret()
        record = await self.store.rotate(key_id, digest(secret), hint_of(secret))
        if record is None:
            raise InvalidRequest(f"The key {key_id} is revoked; create a new one.", param="id", code="key_revoked")
        self.keys.forget(old.digest)
        return 200, {**self._key(record), "key": secret}

    async def _find(self, key_id: str) -> KeyRecord:
        record = await self.store.get_key(key_id) if _KEY_ID.match(key_id) else None
        if record is None:
            raise _no_key(key_id)
        return record

    def _key(self, record: KeyRecord) -> JSONObject:
        return {
            "object": "key",
            "id": record.id,
            "tenant": record.tenant,
            "name": record.name,
            "hint": record.hint,
            "models": list(record.models) if record.models is not None else None,
            "limits": record.limits.model_dump(exclude_none=True) if record.limits is not None else None,
            "budget_micros": record.budget_micros,
            "cache": record.cache.model_dump(exclude_none=True) if record.cache is not None else None,
            "trust": record.trust,
            "created_at": record.created_at,
            "rotated_at": record.rotated_at,
            "revoked_at": record.revoked_at,
            "revoked": record.revoked,
        }

    # --- tenants ----------------------------------------------------------------------------------

    async def put_tenant(self, request: Request) -> Response:
        return await self._call(request, self._put_tenant)

    async def _put_tenant(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        data = await self._body(request)
        unknown = sorted(set(data) - {"name", "limits"})
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}' (expected name, limits).", param=unknown[0])
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest("'name' is required: 1 to 64 letters, digits or any of _ . : -", param="name")
        record, created = await self.store.put_tenant(name, _limits(_optional(data, "limits"), "limits"))
        self.keys.forget()
        return (201 if created else 200), _tenant(record)

    async def list_tenants(self, request: Request) -> Response:
        return await self._call(request, self._list_tenants)

    async def _list_tenants(self, _principal: Principal, _request: Request) -> tuple[int, JSONObject]:
        return 200, {"object": "list", "data": [_tenant(t) for t in await self.store.list_tenants()]}

    async def get_tenant(self, request: Request) -> Response:
        return await self._call(request, self._get_tenant)

    async def _get_tenant(self, _principal: Principal, request: Request) -> tuple[int, JSONObject]:
        name = request.path.removeprefix("/admin/tenants/")
        record = await self.store.get_tenant(name) if _NAME.match(name) else None
        if record is None:
            raise NotFound(f"No tenant named {name[:64]!r}.", param="name", code="tenant_not_found")
        return 200, _tenant(record)

    async def limits(self, request: Request) -> Response:
        return await self._call(request, self._limits)

    async def _limits(self, _principal: Principal, _request: Request) -> tuple[int, JSONObject]:
        body: JSONObject = {"object": "limits"}
        if self.describe_limits is not None:
            body.update(self.describe_limits())
        return 200, body


def _no_key(key_id: str) -> NotFound:
    return NotFound(f"No key with id {key_id[:64]!r}.", param="id", code="key_not_found")


def _optional(data: JSONObject, name: str) -> Any:
    """An optional field's value; null counts as absent (as OpenAI's API treats optional fields)."""
    return data.get(name)


def _integral(value: Any) -> Any:
    """JSON's 5.0 is the integer 5 (as JSON Schema counts it); anything else is left for validation to judge."""
    return int(value) if type(value) is float and value.is_integer() and abs(value) < 2**63 else value


def _tenant(record: TenantRecord) -> JSONObject:
    return {
        "object": "tenant",
        "name": record.name,
        "limits": record.limits.model_dump(exclude_none=True) if record.limits is not None else None,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def _limits(value: Any, param: str) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"'{param}' must be an object (rpm, tpm, request_burst, token_burst, adaptive).", param=param
        )
    try:
        limits = RateLimit.model_validate({k: _integral(v) for k, v in value.items() if v is not None}, strict=True)
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc, param), param=param) from None
    return None if limits.empty and limits.adaptive else limits


def _cache_policy(value: Any) -> CachePolicy | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("'cache' must be an object.", param="cache")
    try:
        return CachePolicy.model_validate(value, strict=True)
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc, "cache"), param="cache") from None


def _first_error(exc: ValidationError, param: str) -> str:
    err = exc.errors()[0]
    where = ".".join([param, *(str(p) for p in err["loc"])])
    return f"'{where}': {err['msg'].removeprefix('Value error, ')}."
