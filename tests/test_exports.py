"""The public surface is exactly what ``__all__`` says, and every name resolves."""

from __future__ import annotations

import runstream


def test_all_names_resolve() -> None:
    for name in runstream.__all__:
        assert getattr(runstream, name) is not None, name


def test_all_is_sorted_and_unique() -> None:
    assert len(set(runstream.__all__)) == len(runstream.__all__)


def test_public_attributes_are_exported() -> None:
    public = {n for n in vars(runstream) if not n.startswith("_") and n not in {"annotations"}}
    modules = {n for n in public if type(getattr(runstream, n)).__name__ == "module"}
    assert public - modules == set(runstream.__all__) - {"__version__"}


def test_every_exception_derives_from_root() -> None:
    for name in runstream.__all__:
        obj = getattr(runstream, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, runstream.RunstreamError), name
