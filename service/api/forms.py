"""multipart/form-data, read strictly: every part's raw bytes, text fields decoded as UTF-8 or refused.

Starlette's `request.form()` decodes a text field that is not valid UTF-8 as Latin-1, so an
expression with broken bytes would be grounded and echoed back garbled. This reader keeps each
part's bytes (so the image part is taken as sent, with or without a filename) and leaves the
decoding to `text()`, which fails instead of guessing. Parsing is python-multipart's, as in
Starlette; the body cap is enforced upstream, by the middleware on `receive`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from diffprompt.service.errors import BadRequest


@dataclass
class FormPart:
    """One part: its field name, whether it was sent as a file (has a filename), its bytes."""

    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)

    def text(self) -> str:
        """The part as UTF-8 text (RFC 7578's default); UnicodeDecodeError if it is not."""
        return self.data.decode("utf-8")


async def read_multipart(content_type: str, chunks: AsyncIterator[bytes], max_parts: int) -> list[FormPart]:
    """Parse a multipart/form-data body into its parts; 400 `bad_request` if it is malformed or has too many."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart/form-data body has no boundary parameter")
    parts: list[FormPart] = []
    ended: list[bool] = []  # on_end: the closing boundary was seen
    headers: dict[bytes, bytes] = {}
    header_name, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        if len(parts) == max_parts:
            raise BadRequest(f"the form has more than {max_parts} parts")
        parts.append(FormPart())
        headers.clear()

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequest("a form part has no Content-Disposition name")
        parts[-1].name = options[b"name"].decode("utf-8", errors="replace")
        parts[-1].is_file = b"filename" in options

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header_name.extend(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_end": lambda: ended.append(True),
    })
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise BadRequest(f"malformed multipart/form-data body ({e})") from None
    if not ended:
        raise BadRequest("the multipart/form-data body ends before its closing boundary")
    return parts
