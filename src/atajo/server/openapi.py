"""The OpenAPI 3.1 document of Atajo's own endpoints, served at ``/openapi.json``.

Request schemas describe what the gateway accepts (its own validation is stricter in places and answers
400); response schemas describe every status a client can get, each error in OpenAI's format.
"""

from __future__ import annotations

from atajo import __version__
from atajo.types import JSONObject

_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*statuses: int) -> JSONObject:
    text = {
        400: "Invalid request (malformed JSON, wrong types)",
        401: "Missing or wrong API key",
        503: "Upstream unavailable (circuit open), or the key store unavailable",
        403: "The key may not do this (another tenant, or master key only)",
        404: "Unknown model, file or batch (another tenant's included)",
        409: "The batch's state does not allow it (cancelling a finished batch)",
        413: "Body over the size limit",
        429: "Rate limited",
        502: "Every upstream attempt failed",
        504: "Upstream timed out",
    }
    return {str(s): {"description": text[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


_MODEL_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)

_CONTENT_PART: JSONObject = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
_CONTENT: JSONObject = {"anyOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART}]}
_MESSAGE_FIELDS: JSONObject = {
    "name": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object"}},
    "tool_call_id": {"type": "string"},
}
_MESSAGE: JSONObject = {
    "anyOf": [
        {  # what the user or system says must have content
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": _CONTENT, **_MESSAGE_FIELDS},
        },
        {  # an assistant turn may be only tool calls
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"enum": ["assistant", "tool", "function"]},
                "content": {"anyOf": [_CONTENT, {"type": "null"}]},
                **_MESSAGE_FIELDS,
            },
        },
    ]
}
_TOOL: JSONObject = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
    },
}

_CHAT_REQUEST: JSONObject = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "pattern": "^[!-~]{1,256}$"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "logit_bias": {"type": "object"},
        "metadata": {"type": "object"},
        "tools": {"type": "array", "items": _TOOL},
        "tool_choice": {"anyOf": [{"type": "string"}, {"type": "object"}]},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
        },
        "user": {"type": "string"},
    },
}

_CHOICE: JSONObject = {
    "type": "object",
    "required": ["index", "message", "finish_reason"],
    "properties": {
        "index": {"type": "integer"},
        "message": {"type": "object", "required": ["role"]},
        "finish_reason": {"type": ["string", "null"]},
    },
}

_SSE_EVENT: JSONObject = {
    "description": "One server-sent event: data is a chat.completion.chunk as JSON, an error object, or [DONE]",
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

_USAGE: JSONObject = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}

_CHAT_COMPLETION: JSONObject = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": _CHOICE},
        "usage": _USAGE,
    },
}

_TOKEN: JSONObject = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

_EMBEDDINGS_REQUEST: JSONObject = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "pattern": "^[!-~]{1,256}$"},
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "string", "minLength": 1}},
                {"type": "array", "minItems": 1, "maxItems": 2048, "items": _TOKEN},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2048,
                    "items": {"type": "array", "minItems": 1, "items": _TOKEN},
                },
            ]
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1, "maximum": 65536},
        "user": {"type": "string"},
    },
}

_EMBEDDINGS: JSONObject = {
    "type": "object",
    "required": ["object", "data", "model"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object", "required": ["index", "embedding"]}},
        "model": {"type": "string"},
        "usage": _USAGE,
    },
}

_MODEL: JSONObject = {
    "type": "object",
    "required": ["id", "object", "owned_by"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "owned_by": {"type": "string"}},
}


def _nullable_optionals(schema: JSONObject) -> JSONObject:
    """Optional request fields may be sent as null, as OpenAI's API and SDKs allow."""
    if "items" in schema:
        schema = {**schema, "items": _nullable_optionals(schema["items"])}
    if "anyOf" in schema:
        schema = {**schema, "anyOf": [_nullable_optionals(branch) for branch in schema["anyOf"]]}
    if "properties" not in schema:
        return schema
    required = set(schema.get("required", ()))
    props = {}
    for name, prop in schema["properties"].items():
        prop = _nullable_optionals(prop)
        props[name] = prop if name in required else {"anyOf": [prop, {"type": "null"}]}
    return {**schema, "properties": props}


_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_TAG = {"type": "string", "pattern": "^[A-Za-z0-9_.:@#=+-]{1,200}$"}
_TENANT = {"anyOf": [_NAME, {"const": "*"}]}
_INVALIDATE_REQUEST: JSONObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "tags": {"type": "array", "items": _TAG, "maxItems": 1000},
        "namespace": _NAME,
        "key_prefix": {"type": "string", "minLength": 1, "maxLength": 512},
        "tenant": _TENANT,
    },
    "anyOf": [
        {"required": ["tags"], "properties": {"tags": {"minItems": 1}}},
        {"required": ["namespace"]},
        {"required": ["key_prefix"]},
    ],
}
_DROPPED = {"type": "object", "additionalProperties": {"type": "integer"}}
_INVALIDATION: JSONObject = {
    "type": "object",
    "required": ["object", "tenant", "dropped", "tiers", "tags"],
    "properties": {
        "object": {"const": "cache.invalidation"},
        "tenant": {"type": "string"},
        "dropped": {"type": "integer", "minimum": 0},
        "tiers": _DROPPED,
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
_FLUSH: JSONObject = {
    "type": "object",
    "required": ["object", "tenant", "dropped", "tiers"],
    "properties": {"object": {"const": "cache.flush"}, "dropped": {"type": "integer", "minimum": 0}, "tiers": _DROPPED},
}
_STATS: JSONObject = {
    "type": "object",
    "required": ["object", "tiers"],
    "properties": {
        "object": {"const": "cache.stats"},
        "tiers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ttl_s", "up", "entries", "bytes", "evictions"],
                "properties": {"name": {"enum": ["memory", "redis", "sql"]}, "up": {"type": "boolean"}},
            },
        },
        "semantic": {
            "type": "object",
            "description": "present when the semantic tier is on",
            "required": ["store", "entries"],
            "properties": {"store": {"enum": ["memory", "pgvector"]}, "entries": {"type": "integer", "minimum": 0}},
        },
    },
}


_FILE: JSONObject = {
    "type": "object",
    "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "file"},
        "bytes": {"type": "integer", "minimum": 0},
        "created_at": {"type": "integer"},
        "expires_at": {"type": ["integer", "null"]},
        "filename": {"type": "string"},
        "purpose": {"enum": ["batch", "batch_output"]},
        "status": {"type": "string"},
    },
}
_BATCH_STATUS = ["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
_BATCH: JSONObject = {
    "type": "object",
    "required": ["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "batch"},
        "endpoint": {"enum": ["/v1/chat/completions", "/v1/embeddings"]},
        "input_file_id": {"type": "string"},
        "completion_window": {"const": "24h"},
        "status": {"enum": _BATCH_STATUS},
        "output_file_id": {"type": ["string", "null"]},
        "error_file_id": {"type": ["string", "null"]},
        "created_at": {"type": "integer"},
        "request_counts": {
            "type": "object",
            "required": ["total", "completed", "failed"],
            "properties": {k: {"type": "integer", "minimum": 0} for k in ("total", "completed", "failed")},
        },
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "usage": {
            "type": "object",
            "description": "tokens as in OpenAI's Batch API, and Atajo's cost figures: cost_micros at the price paid "
            "(batch price through a provider's Batch API), sync_cost_micros at the synchronous price, saved_micros "
            "their difference (millionths of the catalog currency)",
            "properties": {
                k: {"type": "integer"}
                for k in ("input_tokens", "output_tokens", "total_tokens", "cost_micros", "sync_cost_micros")
            },
        },
    },
}
_LIMITS_IN: JSONObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "rpm": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "tpm": {"type": "integer", "minimum": 1, "maximum": 10**12},
        "request_burst": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "token_burst": {"type": "integer", "minimum": 1, "maximum": 10**12},
        "adaptive": {"type": "boolean", "description": "false pins the figures (no adaptive multipliers)"},
    },
}
_CACHE_POLICY_IN: JSONObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean"},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0},
        "cache_sampled": {"type": "boolean"},
        "stale_if_error_s": {"type": "number", "minimum": 0},
        "semantic": {"type": "boolean"},
    },
}
_KEY_REQUEST: JSONObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tenant"],
    "properties": {
        "tenant": {**_NAME},
        "name": {**_NAME},
        "models": {"type": "array", "maxItems": 256, "items": {"type": "string", "pattern": "^[!-~]{1,256}$"}},
        "limits": _LIMITS_IN,
        "budget_micros": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**62,
            "description": "the key's money budget per calendar month (UTC), in millionths of the catalog's "
            "currency; a request that would pass it gets 429 budget_exceeded",
        },
        "cache": _CACHE_POLICY_IN,
        "trust": {"enum": ["auto", "trusted", "untrusted"]},
    },
}
_KEY: JSONObject = {
    "type": "object",
    "required": ["object", "id", "tenant", "hint", "trust", "created_at", "revoked"],
    "properties": {
        "object": {"const": "key"},
        "id": {"type": "string"},
        "tenant": {"type": "string"},
        "hint": {"type": "string"},
        "key": {"type": "string", "description": "the secret: in the answers to create and rotate only"},
        "revoked": {"type": "boolean"},
        "effective": {"type": "object", "description": "limits in force and adaptive multipliers"},
    },
}
_TENANT_REQUEST: JSONObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": {**_NAME}, "limits": {**_LIMITS_IN}},
}
_TENANT_OBJECT: JSONObject = {
    "type": "object",
    "required": ["object", "name", "limits", "created_at", "updated_at"],
    "properties": {"object": {"const": "tenant"}, "name": {"type": "string"}},
}


def _list_of(item: JSONObject) -> JSONObject:
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item},
                       "has_more": {"type": "boolean"}},
    }  # fmt: skip


_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"}


def _path_id(name: str) -> list[JSONObject]:
    return [{"name": name, "in": "path", "required": True, "schema": _ID}]


def _limit(most: int) -> JSONObject:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": most},
    }


_CREATE_BATCH: JSONObject = {
    "type": "object",
    "required": ["input_file_id", "endpoint", "completion_window"],
    "additionalProperties": False,
    "properties": {
        "input_file_id": {"type": "string", "minLength": 1},
        "endpoint": {"enum": ["/v1/chat/completions", "/v1/embeddings"]},
        "completion_window": {"const": "24h"},
        "metadata": {
            "anyOf": [
                {"type": "object", "maxProperties": 16,
                 "additionalProperties": {"type": "string", "maxLength": 512}, "propertyNames": {"maxLength": 64}},
                {"type": "null"},
            ]
        },
    },
}  # fmt: skip


def _batch_paths(bearer: list[JSONObject]) -> JSONObject:
    return {
        "/v1/files": {
            "post": {
                "operationId": "createFile",
                "security": bearer,
                "description": "Upload a batch input: JSONL of {custom_id, method, url, body} lines, each checked",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "purpose"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "purpose": {"const": "batch"},
                                },
                            }
                        }
                    },
                },
                "responses": {"200": _json(_FILE, "The stored file"), **_errors(400, 401, 413)},
            },
            "get": {
                "operationId": "listFiles",
                "security": bearer,
                "parameters": [
                    {"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}},
                    _limit(10_000),
                ],
                "responses": {"200": _json(_list_of(_FILE), "The tenant's files, newest first"), **_errors(400, 401)},
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "operationId": "retrieveFile",
                "security": bearer,
                "parameters": _path_id("file_id"),
                "responses": {"200": _json(_FILE, "The file"), **_errors(401, 404)},
            },
            "delete": {
                "operationId": "deleteFile",
                "security": bearer,
                "parameters": _path_id("file_id"),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "object", "deleted"],
                            "properties": {"object": {"const": "file"}, "deleted": {"const": True}},
                        },
                        "Deleted",
                    ),
                    **_errors(401, 404),
                },
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "operationId": "downloadFile",
                "security": bearer,
                "parameters": _path_id("file_id"),
                "responses": {
                    "200": {
                        "description": "The file's bytes (JSONL)",
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_errors(401, 404),
                },
            }
        },
        "/v1/batches": {
            "post": {
                "operationId": "createBatch",
                "security": bearer,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _CREATE_BATCH}}},
                "responses": {"200": _json(_BATCH, "The batch, validating"), **_errors(400, 401, 404)},
            },
            "get": {
                "operationId": "listBatches",
                "security": bearer,
                "parameters": [
                    {"name": "after", "in": "query", "required": False, "schema": _ID},
                    _limit(100),
                ],
                "responses": {
                    "200": _json(_list_of(_BATCH), "The tenant's batches, newest first"),
                    **_errors(400, 401, 404),
                },
            },
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "operationId": "retrieveBatch",
                "security": bearer,
                "parameters": _path_id("batch_id"),
                "responses": {"200": _json(_BATCH, "The batch"), **_errors(401, 404)},
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "operationId": "cancelBatch",
                "security": bearer,
                "parameters": _path_id("batch_id"),
                "responses": {"200": _json(_BATCH, "The batch, cancelling"), **_errors(401, 404, 409)},
            }
        },
    }


_QUEUED_STATUS = ["queued", "in_progress", "completed", "failed", "expired", "cancelled"]
_QUEUED: JSONObject = {
    "type": "object",
    "required": ["id", "object", "endpoint", "model", "status", "batch_id", "created_at", "response", "error"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "batch.request"},
        "endpoint": {"enum": ["/v1/chat/completions", "/v1/embeddings"]},
        "model": {"type": "string"},
        "status": {"enum": _QUEUED_STATUS},
        "batch_id": {"type": ["string", "null"], "description": "the internal batch it went into, once sealed"},
        "created_at": {"type": "integer"},
        "response": {
            "description": "once answered: as a batch output line's response",
            "anyOf": [
                {
                    "type": "object",
                    "required": ["status_code", "body"],
                    "properties": {"status_code": {"type": "integer"}, "request_id": {"type": "string"}},
                },
                {"type": "null"},
            ],
        },
        "error": {
            "description": "when it got no answer (code batch_cancelled, batch_expired, …)",
            "anyOf": [{"type": "object", "required": ["code", "message"]}, {"type": "null"}],
        },
    },
}
_PRIORITY: JSONObject = {
    "name": "x-atajo-priority",
    "in": "header",
    "required": False,
    "description": "batch: queue the request for the providers' Batch APIs and answer 202 with a handle to poll "
    "at GET /v1/batches/requests/{request_id} (stream is refused); other values are ignored",
    "schema": {"type": "string"},
}
_ACCEPTED: JSONObject = {
    "description": "Queued (x-atajo-priority: batch): a handle; Location is where to poll it",
    "headers": {"location": {"schema": {"type": "string"}}},
    "content": {"application/json": {"schema": _QUEUED}},
}


def _queued_paths(bearer: list[JSONObject]) -> JSONObject:
    return {
        "/v1/batches/requests/{request_id}": {
            "get": {
                "operationId": "retrieveQueuedRequest",
                "security": bearer,
                "parameters": _path_id("request_id"),
                "responses": {
                    "200": _json(_QUEUED, "The queued request, and its answer once it has one"),
                    **_errors(401, 404),
                },
            }
        }
    }


def _json(schema: JSONObject, description: str) -> JSONObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> JSONObject:
    bearer: list[JSONObject] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Atajo",
            "version": __version__,
            "description": "OpenAI-compatible LLM gateway. Model endpoints follow OpenAI's API.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        }
                    },
                }
            },
        },
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": bearer,
                    "parameters": [_PRIORITY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _nullable_optionals(_CHAT_REQUEST)}},
                    },
                    "responses": {
                        "200": {
                            "description": "A completion, or server-sent events of chunks when stream is true",
                            "content": {
                                "application/json": {"schema": _CHAT_COMPLETION},
                                "text/event-stream": {"schema": _SSE_EVENT},
                            },
                        },
                        "202": _ACCEPTED,
                        **_errors(*_MODEL_ERRORS),
                    },
                }
            },
            "/v1/embeddings": {
                "post": {
                    "operationId": "createEmbedding",
                    "security": bearer,
                    "parameters": [_PRIORITY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _nullable_optionals(_EMBEDDINGS_REQUEST)}},
                    },
                    "responses": {
                        "200": _json(_EMBEDDINGS, "Embeddings"),
                        "202": _ACCEPTED,
                        **_errors(*_MODEL_ERRORS),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": bearer,
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["object", "data"],
                                "properties": {
                                    "object": {"const": "list"},
                                    "data": {"type": "array", "items": _MODEL},
                                },
                            },
                            "Public model names",
                        ),
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "operationId": "retrieveModel",
                    "security": bearer,
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _json(_MODEL, "One model"), **_errors(401, 404)},
                }
            },
            "/v1/cache/invalidate": {
                "post": {
                    "operationId": "invalidateCache",
                    "security": bearer,
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _INVALIDATE_REQUEST}}},
                    "responses": {"200": _json(_INVALIDATION, "Entries dropped, per tier"), **_errors(400, 401, 403)},
                }
            },
            "/v1/cache/flush": {
                "post": {
                    "operationId": "flushCache",
                    "security": bearer,
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"tenant": _TENANT},
                                }
                            }
                        },
                    },
                    "responses": {"200": _json(_FLUSH, "Entries dropped, per tier"), **_errors(400, 401, 403)},
                }
            },
            "/v1/cache/stats": {
                "get": {
                    "operationId": "cacheStats",
                    "security": bearer,
                    "responses": {"200": _json(_STATS, "Entries and bytes per tier"), **_errors(401, 403)},
                }
            },
            **_batch_paths(bearer),
            **_queued_paths(bearer),
            "/admin/keys": {
                "post": {
                    "operationId": "createKey",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _nullable_optionals(_KEY_REQUEST)}},
                    },
                    "responses": {
                        "201": _json(_KEY, "The key, with its secret (shown once)"),
                        **_errors(400, 401, 403, 503),
                    },
                },
                "get": {
                    "operationId": "listKeys",
                    "security": bearer,
                    "parameters": [
                        {"name": "tenant", "in": "query", "required": False, "schema": {**_NAME}},
                        {
                            "name": "include_revoked",
                            "in": "query",
                            "required": False,
                            "schema": {"enum": ["true", "false"]},
                        },
                    ],
                    "responses": {"200": _json(_list_of(_KEY), "Keys, without secrets"), **_errors(400, 401, 403, 503)},
                },
            },
            "/admin/keys/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {
                    "operationId": "getKey",
                    "security": bearer,
                    "responses": {"200": _json(_KEY, "One key"), **_errors(401, 403, 404, 503)},
                },
                "delete": {
                    "operationId": "revokeKey",
                    "security": bearer,
                    "responses": {"200": _json(_KEY, "The key, revoked"), **_errors(401, 403, 404, 503)},
                },
            },
            "/admin/keys/{id}/rotate": {
                "post": {
                    "operationId": "rotateKey",
                    "security": bearer,
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json(_KEY, "The key with a new secret (shown once)"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/admin/tenants": {
                "post": {
                    "operationId": "putTenant",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _nullable_optionals(_TENANT_REQUEST)}},
                    },
                    "responses": {
                        "200": _json(_TENANT_OBJECT, "The tenant, updated"),
                        "201": _json(_TENANT_OBJECT, "The tenant, created"),
                        **_errors(400, 401, 403, 503),
                    },
                },
                "get": {
                    "operationId": "listTenants",
                    "security": bearer,
                    "responses": {"200": _json(_list_of(_TENANT_OBJECT), "Tenants"), **_errors(401, 403, 503)},
                },
            },
            "/admin/tenants/{name}": {
                "get": {
                    "operationId": "getTenant",
                    "security": bearer,
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _json(_TENANT_OBJECT, "One tenant"), **_errors(401, 403, 404, 503)},
                }
            },
            "/admin/limits": {
                "get": {
                    "operationId": "getLimits",
                    "security": bearer,
                    "responses": {
                        "200": _json({"type": "object", "required": ["object"]}, "Multipliers and limits in force"),
                        **_errors(401, 403),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "responses": {"200": _json({"type": "object", "required": ["status"]}, "Alive")},
                }
            },
            "/ready": {
                "get": {
                    "operationId": "ready",
                    "responses": {
                        "200": _json({"type": "object", "required": ["status", "checks"]}, "Ready"),
                        "503": _json({"type": "object", "required": ["status", "checks", "error"]}, "Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
    }
