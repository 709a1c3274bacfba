"""The small vocabulary shared by every layer."""

from __future__ import annotations

from typing import Any, TypeAlias

JSON: TypeAlias = Any
"""A value decoded from (or about to be encoded as) JSON."""

JSONObject: TypeAlias = dict[str, Any]
