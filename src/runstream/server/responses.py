"""JSON answers that can always be sent.

Input is checked so that everything stored can be encoded as UTF-8 (see
:mod:`runstream.core.jsonbody`). Rows stored before that rule, or by another
program, may still hold a lone surrogate in a run's params or a stream's close
status. :class:`JSONResponse` then escapes it (``\\ud800``, pure ASCII, still the
same JSON string) instead of failing the response, and with it every listing
that contains the row.
"""

from __future__ import annotations

import json
from typing import Any

from starlette import responses

from runstream.core.model import Page


class JSONResponse(responses.JSONResponse):
    """Starlette's JSON answer, falling back to ASCII escapes for unencodable text."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(
                content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")


def page_response(page: Page) -> responses.Response:
    """A JSON page (``Page.to_json()``) built from the events' stored data text.

    An empty epoch (the page of a stream that does not exist yet: no history, no
    epoch) is sent as ``null``.
    """
    head = json.dumps(
        {"stream": page.stream, "epoch": page.epoch or None},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    events = ",".join([e.to_json_text() for e in page.events])
    body = (
        f'{head[:-1]},"events":[{events}],"next_after":{page.next_after},'
        f'"closed":{"true" if page.closed else "false"}}}'
    )
    return responses.Response(body.encode("utf-8"), media_type="application/json")
