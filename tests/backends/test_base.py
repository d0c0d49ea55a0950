"""What EventLog itself provides to backends that do not override it."""

from __future__ import annotations

import pytest

from runstream.backends.base import _decode_all
from runstream.backends.memory.log import MemoryEventLog
from runstream.core.model import EncodedEvents, encode_data
from runstream.errors import StreamNotFound, ValidationError


def test_decode_all_parses_each_text_once_joined() -> None:
    values: list[object] = [{"line": 'a "b" \\ c'}, [1, 2.5], None, "s", 0, {"k": {}}]
    assert _decode_all([encode_data(v) for v in values]) == values
    assert _decode_all([]) == []


@pytest.mark.parametrize(
    "texts",
    [["{not json"], ["1", "2,3"], [""], ["1", " "], [b"1"]],  # type: ignore[list-item]
)
def test_decode_all_refuses_what_is_not_one_json_value_each(texts: list[str]) -> None:
    with pytest.raises(ValidationError):
        _decode_all(texts)


async def test_default_encoded_append_refuses_bad_json_and_stores_nothing() -> None:
    async with MemoryEventLog() as log:
        good = EncodedEvents("stdout", ['{"line":"a"}'])
        with pytest.raises(ValidationError):
            await log.append_encoded("s", [good, EncodedEvents("stdout", ["1,2"])])
        with pytest.raises(StreamNotFound):
            await log.info("s")
        res = await log.append_encoded("s", [good, EncodedEvents("stderr", ["[1]", "null"])])
        assert (res.first_id, res.last_id) == (1, 3)
        page = await log.read("s")
        assert [(e.type, e.data) for e in page.events] == [
            ("stdout", {"line": "a"}),
            ("stderr", [1]),
            ("stderr", None),
        ]
