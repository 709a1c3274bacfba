"""``multipart/form-data`` request bodies (RFC 7578), as ``POST /v1/files`` receives them: just enough to
read named fields and one file, with every malformation answered as a 400 naming what is wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass

from atajo.errors import InvalidRequest

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([A-Za-z*]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))')


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def boundary_of(content_type: str) -> str:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "multipart/form-data":
        raise InvalidRequest(
            f"Upload files as multipart/form-data (with the fields `file` and `purpose`), not {kind or 'no type'}."
        )
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InvalidRequest("The multipart/form-data content type has no boundary.")
    return match.group(1) or match.group(2)


def parse(content_type: str, body: bytes) -> dict[str, Part]:
    """The parts by name (a repeated name: the first one)."""
    delimiter = b"\r\n--" + boundary_of(content_type).encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    parts: dict[str, Part] = {}
    ended = False
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            ended = True
            break
        head_and_data = chunk.lstrip(b" \t")
        if not head_and_data.startswith(b"\r\n"):
            raise InvalidRequest("The multipart body is malformed: a boundary line is not followed by a line break.")
        head, sep, data = head_and_data[2:].partition(b"\r\n\r\n")
        if not sep:
            raise InvalidRequest("The multipart body is malformed: a part has no blank line after its headers.")
        part = _part(head.decode("utf-8", "replace"), data)
        parts.setdefault(part.name, part)
    if not ended:
        raise InvalidRequest("The multipart body is malformed: it does not end with the closing boundary.")
    return parts


def _part(head: str, data: bytes) -> Part:
    headers: dict[str, str] = {}
    for line in head.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise InvalidRequest("The multipart body is malformed: a part header has no colon.")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise InvalidRequest("Every multipart part needs `Content-Disposition: form-data; name=...`.")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(disposition):
        quoted, bare = m.group(2), m.group(3)
        params[m.group(1).lower()] = quoted if quoted is not None else str(bare)
    part_name = params.get("name")
    if not part_name:
        raise InvalidRequest("A multipart part has no name.")
    return Part(part_name, params.get("filename"), headers.get("content-type"), data)
