"""What llmswap reads of a request body: the model (and whether it streams) of a JSON object,
or the ``model`` field of a ``multipart/form-data`` body without reading the files in it.

Audio transcriptions and image edits name their model in a form field beside a file that may be
a hundred megabytes.  Twisted keeps such a body in a temporary file; :func:`field` reads it part
by part in small chunks, looking only at each part's headers and at the wanted field's value, so
the file parts are never held in memory (the body is then relayed from the same temporary file).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, BinaryIO

from twisted.web.iweb import IRequest

from llmswap import errors

CHUNK = 64 * 1024
HEADERS_MAX = 16 * 1024  # a part's headers longer than this are not a form's
_BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


class FormError(ValueError):
    """The body is not the multipart form its content type says."""


def boundary(content_type: bytes | None) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type; None for any other type."""
    if not content_type or not content_type.lower().startswith(b"multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise FormError("multipart/form-data without a boundary")
    return match.group(1) or match.group(2)


class _Reader:
    """A file read forward in chunks, keeping only what is not consumed yet."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.buf = b""
        self.eof = False

    def fill(self) -> bool:
        chunk = self._f.read(CHUNK)
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def until(self, marker: bytes, keep: bool, limit: int | None = None) -> bytes | None:
        """Consume up to and including ``marker``; return what came before it when ``keep``
        (None when the marker never comes, or comes after ``limit`` bytes)."""
        kept = b""
        while True:
            at = self.buf.find(marker)
            if at >= 0:
                kept += self.buf[:at] if keep else b""
                self.buf = self.buf[at + len(marker) :]
                return kept if limit is None or len(kept) <= limit else None
            # Keep a tail that may hold the marker's start; the rest is consumed.
            cut = max(0, len(self.buf) - len(marker) + 1)
            if keep:
                kept += self.buf[:cut]
                if limit is not None and len(kept) > limit:
                    return None
            self.buf = self.buf[cut:]
            if not self.fill():
                return None


def field(f: BinaryIO, separator: bytes, name: str, limit: int = 4096) -> str | None:
    """The value of the plain (non-file) field ``name`` of the form in ``f``; None when the form
    has no such field.  ``f`` is read from its start; the caller rewinds it for the relay."""
    f.seek(0)
    reader = _Reader(f)
    delimiter = b"--" + separator
    if reader.until(delimiter, keep=False) is None:
        raise FormError("the body has none of its boundary's delimiters")
    while True:
        while len(reader.buf) < 2 and reader.fill():
            pass
        if reader.buf.startswith(b"--"):  # the closing delimiter
            return None
        headers = reader.until(b"\r\n\r\n", keep=True, limit=HEADERS_MAX)
        if headers is None:
            raise FormError("a part's headers do not end")
        match = _NAME.search(headers)
        wanted = match is not None and match.group(1).decode("utf-8", "replace") == name
        if wanted and b"filename=" not in headers.lower():
            value = reader.until(b"\r\n" + delimiter, keep=True, limit=limit)
            if value is None:
                raise FormError(f"the form field '{name}' is longer than {limit} bytes")
            return value.decode("utf-8", "replace")
        if reader.until(b"\r\n" + delimiter, keep=False) is None:
            raise FormError("a part does not end")


def json_object(body: bytes, max_bytes: int, empty_ok: bool = False) -> dict[str, Any]:
    """A request body that must be a JSON object (``{}`` when empty and ``empty_ok``)."""
    if len(body) > max_bytes:
        raise errors.too_large(len(body), max_bytes)
    if empty_ok and not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.invalid_json(str(e)) from None
    except RecursionError:  # nested deeper than Python's parser recurses
        raise errors.invalid_json("nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.bad_request("Request body must be a JSON object", "invalid_json")
    return data


def parse_body(body: bytes, max_bytes: int) -> tuple[str, bool, str | None]:
    """Read ``model``, ``stream`` and OpenAI's ``user`` (who asks, when the client says) from a
    JSON request body, rejecting anything unusable."""
    data = json_object(body, max_bytes)
    model = data.get("model")
    if model is None:
        raise errors.bad_request(
            "Missing required parameter: 'model'", "missing_required_parameter", "model"
        )
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' must be a non-empty string", "invalid_type", "model")
    user = data.get("user")
    return model, data.get("stream") is True, user if isinstance(user, str) and user else None


def check_size(upload: BinaryIO, max_bytes: int) -> None:
    """413 for an uploaded body (a file) over ``max_bytes``."""
    upload.seek(0, os.SEEK_END)
    if upload.tell() > max_bytes:
        raise errors.too_large(upload.tell(), max_bytes, "max_upload_bytes")


def form_model(request: IRequest, upload: BinaryIO, max_bytes: int) -> str:
    """The ``model`` field of a multipart form, read without reading its files."""
    check_size(upload, max_bytes)
    try:
        separator = boundary(request.getHeader(b"content-type"))
        model = field(upload, separator, "model") if separator else None
    except FormError as e:
        raise errors.bad_request(f"Invalid multipart form: {e}", "invalid_form") from None
    if not model:
        raise errors.bad_request(
            "Missing required form field: 'model'", "missing_required_parameter", "model"
        )
    return model
