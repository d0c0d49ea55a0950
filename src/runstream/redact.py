"""Keeping secrets out of logs and messages: :func:`mask_secrets` and :class:`RedactingFilter`.

Two kinds of secret travel inside strings runstream prints or logs:

- the password in a URL's userinfo (``redis://user:pass@host``,
  ``rediss://:pass@host``; a bare ``scheme://secret@host`` is masked whole,
  since that is where tokens go too), and
- query parameters that carry credentials (``?token=`` for an
  ``EventSource``, ``?password=`` in a Redis URL, ...), whatever their percent
  encoding.

:func:`mask_secrets` replaces both with ``***`` and leaves everything else as
it was. Every message that shows a backend URL goes through it, and
:func:`install_log_redaction` puts :class:`RedactingFilter` on uvicorn's
access and error loggers (the error logger prints WebSocket paths with their
query strings).
"""

from __future__ import annotations

import logging
import re
from typing import Final
from urllib.parse import unquote_plus

__all__ = ["MASK", "SECRET_PARAMS", "RedactingFilter", "install_log_redaction", "mask_secrets"]

MASK: Final = "***"

SECRET_PARAMS: Final = frozenset(
    {
        "token",
        "access_token",
        "auth",
        "authorization",
        "password",
        "passwd",
        "secret",
        "api_key",
        "apikey",
        "ticket",
    }
)
"""Query parameter names (compared case-insensitively, percent-decoded) whose values are masked."""

# scheme://netloc: userinfo is everything in the netloc before its *last* "@".
_NETLOC: Final = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^/?#\s\"'<>]*)")
# One query pair, after "?" or "&" (or ";", which some servers still split on).
_PARAM: Final = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s\"'<>?]+)=(?P<value>[^&;#\s\"'<>]*)")


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, netloc = match.group("scheme"), match.group("netloc")
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return match.group(0)
    user, colon, _password = userinfo.partition(":")
    masked = f"{user}:{MASK}" if colon else MASK
    return f"{scheme}{masked}@{host}"


def _mask_param(match: re.Match[str]) -> str:
    name = match.group("name")
    if unquote_plus(name).strip().lower() not in SECRET_PARAMS or not match.group("value"):
        return match.group(0)
    return f"{match.group('lead')}{name}={MASK}"


def mask_secrets(text: str) -> str:
    """``text`` with URL passwords and secret query parameters replaced by ``***``.

    Works on a bare URL, a request path with its query string, or any message
    that contains them. Idempotent; text without secrets comes back unchanged.
    """
    if "@" in text:
        text = _NETLOC.sub(_mask_userinfo, text)
    if "=" in text:
        text = _PARAM.sub(_mask_param, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that runs :func:`mask_secrets` over a record's message and arguments.

    Arguments are masked one by one (not the formatted message), so formatters
    that unpack ``record.args`` themselves, like uvicorn's access formatter,
    keep working.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask_secrets(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: mask_secrets(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


REDACTED_LOGGERS: Final = ("uvicorn.access", "uvicorn.error", "uvicorn.asgi")
"""uvicorn's loggers that print request paths with their query strings."""


def install_log_redaction(names: tuple[str, ...] = REDACTED_LOGGERS) -> None:
    """Put one :class:`RedactingFilter` on each named logger (idempotent).

    A logger's filters apply to the records logged on it, whatever handlers
    the application configures later; they survive uvicorn's ``dictConfig``.
    """
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
