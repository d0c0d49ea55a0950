"""``mask_secrets`` and the logging filter: passwords and tokens never reach a log line."""

from __future__ import annotations

import logging

import pytest

from runstream.redact import RedactingFilter, install_log_redaction, mask_secrets


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://user:hunter2@db:6379/0", "redis://user:***@db:6379/0"),
        ("rediss://:hunter2@db:6380/0?prefix=x", "rediss://:***@db:6380/0?prefix=x"),
        ("redis://p%40ss:w%3Ard@db/0", "redis://p%40ss:***@db/0"),
        ("redis://u:p@ss@db/0", "redis://u:***@db/0"),  # an unescaped @ in the password
        ("https://ghp_secret@example.com/x", "https://***@example.com/x"),
        ("redis://db:6379/0?password=hunter2&db=1", "redis://db:6379/0?password=***&db=1"),
        ("/v1/streams/s/events?token=abc", "/v1/streams/s/events?token=***"),
        ("/v1/x?after=3&token=abc&limit=5", "/v1/x?after=3&token=***&limit=5"),
        ("/v1/x?%74oken=abc", "/v1/x?%74oken=***"),
        ("/v1/x?TOKEN=abc", "/v1/x?TOKEN=***"),
        ("/v1/x?a=1;access_token=abc", "/v1/x?a=1;access_token=***"),
        ('"GET /v1/x?token=abc HTTP/1.1" 200', '"GET /v1/x?token=*** HTTP/1.1" 200'),
        ("can't reach redis://:pw@h:1/0 (refused)", "can't reach redis://:***@h:1/0 (refused)"),
    ],
)
def test_secrets_are_masked(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked
    assert mask_secrets(masked) == masked  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///./.runstream/runstream.db",
        "redis://db:6379/0?prefix=rs",
        "/v1/streams/s/events?after=3&limit=10",
        "/v1/x?tokens=1&mytoken=2",  # other names are left alone
        "/v1/x?token=",
        "user@example.com wrote a=b",
        "memory://",
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert mask_secrets(text) == text


def test_filter_masks_arguments_and_keeps_their_shape() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/x?token=abc", "1.1", 200),
        None,
    )  # fmt: skip
    assert RedactingFilter().filter(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/v1/x?token=***", "1.1", 200)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /v1/x?token=*** HTTP/1.1" 200'


def test_filter_masks_the_message_and_mapping_arguments() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "url redis://:pw@h/0 %(path)s", None, None
    )
    record.args = {"path": "/a?token=t"}
    RedactingFilter().filter(record)
    assert record.getMessage() == "url redis://:***@h/0 /a?token=***"


def test_install_is_idempotent(caplog: pytest.LogCaptureFixture) -> None:
    name = "runstream.test.redact"
    install_log_redaction((name,))
    install_log_redaction((name,))
    logger = logging.getLogger(name)
    try:
        assert sum(isinstance(f, RedactingFilter) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=name):
            logger.info("GET %s", "/v1/x?token=abc")
        assert caplog.messages == ["GET /v1/x?token=***"]
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)
