"""A reader's position in a stream, without I/O: what each item a transport delivers means.

Every reader of a stream, whatever its transport (SSE, WebSocket, JSON
long-poll, or a server-side reader of the log), faces the same questions for
each item it receives: is this event the next one, one I already have, one
beyond a hole, or from another history? Where do I resume after a dropped
connection? :class:`ReaderPosition` answers them; the caller does the I/O.

Rules (SPEC §1, "Event" and "Epoch"):

* **Ids are contiguous within an epoch.** Once the position is *pinned* (an id
  or an epoch is known), the only acceptable next id is ``offset + 1``.
  Anything at or below ``offset`` is a duplicate (a server replaying history
  after a resume) and is dropped; anything beyond ``offset + 1`` is a gap (the
  connection lost or mangled something): drop the connection and resume from
  the position. A reader starting from nothing (offset 0, no epoch) accepts
  any first id, because the start of the history may have been trimmed.
* **An event from another epoch** than the pinned one means the server should
  have sent a reset first: reconnect, and the server will.
* **A reset** (history lost) moves the position to ``(reset.epoch,
  reset.after)``; the next id must be ``after + 1``.
* **The end entry** is the last item; nothing is accepted after it.
* **The position advances only for items handed over** (:meth:`delivered`,
  :meth:`reset`), never for items merely received: a consumer that stops
  before taking an item must not skip it on resume.

Usage::

    pos = ReaderPosition.parse(after)          # None, 41, "41", "<epoch>:41"
    verdict = pos.on_event(id, type, epoch)     # decide
    if verdict in ("deliver", "end"):
        hand_over(event)
        pos.delivered(id, type, epoch)          # then commit
    ...
    reconnect_with(pos.token)                   # "<epoch>:<id>" or "<id>"
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from runstream.core.model import END_TYPE, Reset, StreamInfo
from runstream.protocol.cursor import Position, parse_position

__all__ = ["ReaderPosition", "Verdict"]

Verdict: TypeAlias = Literal["deliver", "end", "duplicate", "gap", "epoch_mismatch", "after_end"]
"""What to do with one received event.

* ``"deliver"`` — hand it over, then call :meth:`ReaderPosition.delivered`;
* ``"end"`` — the same, and it is the stream's last item;
* ``"duplicate"`` — drop it silently (already handed over);
* ``"gap"`` — drop the connection and resume from the position (something was lost);
* ``"epoch_mismatch"`` — drop the connection and resume (the server owes a reset);
* ``"after_end"`` — drop it: the end entry was already handed over.
"""


class ReaderPosition:
    """Where one reader is (``epoch``, ``offset``) and whether the next id is known.

    ``offset`` is the id of the last event handed over (0 = nothing yet);
    ``epoch`` is ``None`` until the reader learns it (from a resume position,
    the first event, a reset or :meth:`learn_epoch`). ``pinned`` is true once
    the next id is exactly ``offset + 1`` (after any delivery or reset, or when
    starting after an id > 0). ``ended`` is true once the end entry was handed
    over. Not thread-safe; one reader owns it.
    """

    __slots__ = ("ended", "epoch", "offset", "pinned")

    def __init__(self, offset: int = 0, epoch: str | None = None) -> None:
        if offset < 0:
            raise ValueError("offset must be >= 0")
        self.offset = offset
        self.epoch = epoch
        # Offset 0 means "from the start of what is retained" (SPEC: never a
        # reset), which may be any id if the history was trimmed.
        self.pinned = offset > 0
        self.ended = False

    @classmethod
    def parse(cls, after: str | int | None) -> ReaderPosition:
        """From ``None`` / ``""`` (the beginning), an id, or ``"<epoch>:<id>"``.

        ``"now"`` is not a position but a request to find one: resolve it with
        :meth:`at_tail` once the stream's state is known. Raises
        :class:`~runstream.errors.ValidationError` for anything else.
        """
        pos = parse_position(after, allow_now=False)
        return cls(pos.offset, pos.epoch)

    @classmethod
    def at_tail(cls, info: StreamInfo | None) -> ReaderPosition:
        """The position that sees only what is appended after ``info`` was read.

        A closed stream still hands over its end entry, so the position is
        just before it. ``None`` (the stream does not exist yet) is the
        beginning, pinned to id 1: everything it will hold is new.
        """
        if info is None:
            pos = cls()
            pos.pinned = True
            return pos
        last = info.tail
        return cls(last, info.epoch)

    # -- where to resume -------------------------------------------------------

    @property
    def token(self) -> str:
        """The resume position as text: ``"<epoch>:<id>"``, or ``"<id>"`` before the epoch is known.

        It is what SSE sends as ``Last-Event-ID``, what WebSocket and long-poll
        send as ``after``, and what a checkpoint stores.
        """
        return f"{self.epoch}:{self.offset}" if self.epoch is not None else str(self.offset)

    def as_position(self) -> Position:
        """The same, as the :class:`~runstream.protocol.cursor.Position` servers read from."""
        return Position(self.offset, self.epoch)

    # -- deciding --------------------------------------------------------------

    def on_event(self, id: int, type: str | None = None, epoch: str | None = None) -> Verdict:
        """Decide what the received event ``id`` (of ``type``, in ``epoch`` if known) means.

        Changes nothing: call :meth:`delivered` once the event was handed over.
        """
        if self.ended:
            return "after_end"
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            return "epoch_mismatch"
        if id <= self.offset:
            return "duplicate"
        if self.pinned and id != self.offset + 1:
            return "gap"
        return "end" if type == END_TYPE else "deliver"

    # -- committing ------------------------------------------------------------

    def learn_epoch(self, epoch: str) -> None:
        """Adopt ``epoch`` (from the stream's state) when none is known yet.

        For transports whose events do not carry it (WebSocket): resuming
        with ``"<epoch>:<id>"`` is what lets the server notice a re-created
        stream. Does not pin the position.
        """
        if self.epoch is None:
            self.epoch = epoch

    def delivered(self, id: int, type: str | None = None, epoch: str | None = None) -> None:
        """Record that event ``id`` was handed over (after :meth:`on_event` said to)."""
        if epoch is not None:
            self.epoch = epoch
        self.offset = id
        self.pinned = True
        if type == END_TYPE:
            self.ended = True

    def advance(self, id: int, type: str | None = None, epoch: str | None = None) -> Verdict:
        """:meth:`on_event` and, for ``"deliver"`` / ``"end"``, :meth:`delivered`, in one call.

        For a reader that hands an item over the moment it decides to (a
        server's subscription putting a frame into its client's buffer); a
        reader that may fail to hand over must decide and commit separately.
        """
        # on_event and delivered, inlined: servers call this once per frame per client.
        if self.ended:
            return "after_end"
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            return "epoch_mismatch"
        if id <= self.offset:
            return "duplicate"
        if self.pinned and id != self.offset + 1:
            return "gap"
        if epoch is not None:
            self.epoch = epoch
        self.offset = id
        self.pinned = True
        if type == END_TYPE:
            self.ended = True
            return "end"
        return "deliver"

    def skip(self, id: int, epoch: str | None = None) -> None:
        """Move past event ``id`` without handing it over (it is unusable and will stay so)."""
        self.delivered(id, None, epoch)

    def reset(self, reset: Reset) -> Reset:
        """History was lost: continue after ``reset.after`` in ``reset.epoch``.

        Returns the reset to hand over, its ``requested`` being the position
        it replaced (what this reader had, whatever the server assumed).
        """
        requested = self.offset
        self.epoch = reset.epoch
        self.offset = reset.after
        self.pinned = True
        if reset.requested == requested:
            return reset
        return Reset(reset.epoch, reset.after, reset.reason, requested)

    def __repr__(self) -> str:
        flags = "".join((" pinned" if self.pinned else "", " ended" if self.ended else ""))
        return f"ReaderPosition({self.token!r}{flags})"
