"""Untrusted JSON in: one parser and one rule for every string the API stores.

What the API accepts it must be able to serve back on every transport (SPEC §3):
a JSON page, an SSE frame and a WebSocket message are all UTF-8. JSON text may
still spell strings that UTF-8 cannot hold: an escaped lone surrogate
(``"\\ud800"``) decodes to a Python ``str`` that fails to encode. Stored, such a
string would make every later read of the stream, run or list fail. So every
request body goes through :func:`parse_json`, which refuses (with the JSON path
of the offending value) what could not be served:

- bytes that are not UTF-8;
- text that is not one JSON value, or numbers Python cannot hold
  (``int`` over 4,300 digits);
- strings (keys or values) with a lone surrogate;
- nesting deeper than ``max_depth`` (deep documents exhaust the recursion limit
  of whoever encodes or decodes them next, often in a reader far from here).

Non-finite numbers (``1e400``, ``NaN``) parse here and are refused where the data
is encoded for storage (:func:`runstream.core.model.encode_data`).

The checks cost two substring scans for ordinary bodies; the full walk of the
decoded value runs only when a scan says it might find something.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from runstream.errors import ValidationError

DEFAULT_MAX_DEPTH: Final = 64
"""Default nesting limit of request bodies (``limits.max_json_depth``)."""

# An escape that decodes to a surrogate code point (paired or not): only bodies
# containing one need the walk that finds lone ones.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(
    body: bytes | str, *, max_depth: int | None = DEFAULT_MAX_DEPTH, what: str = "body"
) -> Any:
    """Decode a request body, refusing anything that could not be stored and served.

    ``max_depth=None`` leaves the depth to the caller, who must then call
    :func:`check_depth` on what it keeps (appends do it per event: cheaper than
    walking a whole batch). Raises :class:`ValidationError` (HTTP 400) naming
    ``what`` and, for a bad string or depth, the path of the value (``body[2].type``).
    """
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(
                f"{what} is not valid UTF-8 (byte {exc.start})", field=what
            ) from None
    else:
        text = body
    limit = DEFAULT_MAX_DEPTH if max_depth is None else max_depth
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValidationError(
            f"{what} is nested too deeply (the limit is {limit} levels)", field=what
        ) from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise ValidationError(f"{what} is not valid JSON: {exc}", field=what) from None
    surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    deep = max_depth is not None and _may_exceed(text, max_depth)
    if surrogates or deep:
        check_value(value, max_depth=max_depth, where=what)
    return value


def check_depth(value: Any, encoded: str, *, max_depth: int, where: str) -> None:
    """Refuse ``value`` (whose compact JSON is ``encoded``) if nested over ``max_depth``."""
    if _may_exceed(encoded, max_depth):
        check_value(value, max_depth=max_depth, where=where)


def _may_exceed(text: str, max_depth: int) -> bool:
    # Nesting is at most the number of opening brackets (strings may hold some too):
    # two C-speed scans settle almost every real body without a walk.
    return text.count("[") + text.count("{") > max_depth


def check_value(
    value: Any, *, max_depth: int | None = DEFAULT_MAX_DEPTH, where: str = "body"
) -> None:
    """Refuse a decoded JSON value nested over ``max_depth`` or holding a lone surrogate.

    Iterative, so a value too deep for the recursion limit is refused like any other.
    Paths are kept as (parent, key) links and spelt out only for the error.
    ``max_depth=None`` checks strings only.
    """
    limit = max_depth if max_depth is not None else 1 << 30
    stack: list[tuple[Any, int, Any]] = [(value, 1, where)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth, link = pop()
        if isinstance(item, str):
            if not item.isascii():
                check_text(item, where=_spell(link))
        elif isinstance(item, dict):
            if depth > limit:
                raise _too_deep(link, limit, where)
            for key, child in item.items():
                if not key.isascii():
                    check_text(key, where=_spell(link) + f" (key {key[:40]!r})")
                if isinstance(child, str | dict | list):
                    push((child, depth + 1, (link, key)))
        elif isinstance(item, list):
            if depth > limit:
                raise _too_deep(link, limit, where)
            for i, child in enumerate(item):
                if isinstance(child, str | dict | list):
                    push((child, depth + 1, (link, i)))


def _too_deep(link: Any, max_depth: int, where: str) -> ValidationError:
    return ValidationError(
        f"{_short(_spell(link))}: nested deeper than the limit of {max_depth} levels", field=where
    )


def _spell(link: Any) -> str:
    keys: list[str] = []
    while isinstance(link, tuple):
        link, key = link
        keys.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return str(link) + "".join(reversed(keys))


def is_utf8(text: str) -> bool:
    """True if UTF-8 can encode ``text`` (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, *, where: str) -> str:
    """Return ``text`` if UTF-8 can hold it, else raise :class:`ValidationError` at ``where``."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{_short(where)}: contains an unpaired surrogate (U+{ord(text[exc.start]):04X}) "
            "that UTF-8 cannot encode",
            field=_short(where),
        ) from None
    return text


def _short(path: str) -> str:
    # A path built from user keys can be long; keep messages readable.
    return path if len(path) <= 120 else path[:117] + "..."
