"""Per-sequence LSTM state between requests, as Triton's sequence batcher keeps it.

Plain Python and numpy, no server: usable inside a Triton python-backend ``model.py`` too.
A stream of requests shares a ``sequence_id``; the first carries ``sequence_start``, the last
``sequence_end``. Between them the store keeps each sequence's state: every LSTM's ``(h, c)``,
by the name of the input that takes it in the next chunk::

    store = SequenceStore(initial_state=lambda: {"h0": np.zeros((1, L, H)), "c0": ...})
    state = store.acquire(seq_id, start=True)       # zeros (or the caller's h0/c0)
    ...run the chunk from state, get hn and cn...
    store.release(seq_id, {"h0": hn, "c0": cn}, end=False)  # kept for the next chunk
    # on failure: store.cancel(seq_id) keeps the state from before the chunk

A sequence is freed at ``sequence_end``, after ``idle_timeout_s`` without a request, or, when a
new sequence would pass ``max_sequences``, by evicting the sequence idle the longest. A sequence
is busy between ``acquire`` and ``release``/``cancel``; busy sequences are never evicted and a
second ``acquire`` of a busy sequence is refused (the caller serializes chunks of one sequence).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadRequest, ServerFault, Unavailable

# Every LSTM's (h, c), batch first ((1, L, H_out), (1, L, H)), by the input that takes it.
State = dict[str, np.ndarray]

# Triton's sequence ids: an unsigned 64-bit integer or a string (0 and "": no sequence).
MAX_SEQUENCE_ID = 2**64 - 1
MAX_SEQUENCE_ID_CHARS = 128


def check_sequence_id(value: Any) -> int | str:
    """``value`` if it is a sequence id Triton takes; BadRequest naming the rule otherwise."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if integer and 0 <= value <= MAX_SEQUENCE_ID:
        return int(value)
    if isinstance(value, str) and len(value) <= MAX_SEQUENCE_ID_CHARS:
        return value
    if isinstance(value, str):
        got = f"a string of {len(value)} characters"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        got = f"an integer of {value.bit_length()} bits"
    else:
        got = f"{type(value).__name__} {value!r:.40}"
    raise BadRequest(
        f"sequence_id must be an unsigned 64-bit integer or a string of at most "
        f"{MAX_SEQUENCE_ID_CHARS} characters, got {got}"
    )


def initial_state(
    tensors: dict[str, np.ndarray], state_inputs: tuple[str, ...], start: bool
) -> State | None:
    """The state a request of a sequence gives for its start (all of ``state_inputs``), or None;
    BadRequest if it gives some but not all of them, or gives them past the start."""
    given = {n: tensors[n] for n in state_inputs if n in tensors}
    if given and (not start or len(given) != len(state_inputs)):
        names = " and ".join(filter(None, (", ".join(state_inputs[:-1]), state_inputs[-1])))
        raise BadRequest(f"{names} may be given only together, and only with sequence_start")
    return given or None


@dataclass
class _Entry:
    state: State
    last_used: float
    busy: bool = False
    fresh: bool = False  # created by the acquire in flight: cancel removes it


class SequenceStore:
    """Live sequences' states, keyed by sequence id.

    Args:
        initial_state: makes the zero state of a new sequence (called at ``sequence_start``
            when the caller gives no initial state).
        max_sequences: cap on live sequences; at the cap, a new one evicts the idle-longest.
        idle_timeout_s: a sequence with no request for this long is freed.
        clock: seconds, monotonic (injectable for tests).

    Raises (from ``acquire``):
        BadRequest: a non-start request for a sequence that is not live (never started, ended,
            or evicted), or a chunk for a sequence whose previous chunk is still running.
        Unavailable: at the cap with every live sequence busy.
    """

    def __init__(
        self,
        initial_state: Callable[[], State],
        max_sequences: int = 1024,
        idle_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sequences < 1 or idle_timeout_s <= 0:
            raise ValueError("max_sequences must be >= 1 and idle_timeout_s > 0")
        self._initial_state = initial_state
        self.max_sequences = max_sequences
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        # Least recently used first: eviction takes from the front.
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.evicted_idle = 0
        self.evicted_cap = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sequence_id: Hashable) -> bool:
        return sequence_id in self._entries

    def evict_idle(self) -> list[Hashable]:
        """Free every idle sequence unused for ``idle_timeout_s``; return their ids."""
        cutoff = self._clock() - self.idle_timeout_s
        gone = [k for k, e in self._entries.items() if not e.busy and e.last_used <= cutoff]
        for key in gone:
            del self._entries[key]
        self.evicted_idle += len(gone)
        return gone

    def _make_room(self) -> None:
        while len(self._entries) >= self.max_sequences:
            victim = next((k for k, e in self._entries.items() if not e.busy), None)
            if victim is None:
                raise Unavailable(f"all {self.max_sequences} live sequences are busy; retry later")
            del self._entries[victim]
            self.evicted_cap += 1

    def acquire(self, sequence_id: Hashable, start: bool, initial: State | None = None) -> State:
        """Mark the sequence busy and return the state its next chunk starts from.

        At ``start`` the sequence is (re)started from ``initial`` or zeros; otherwise it must be
        live. ``initial`` is only allowed at ``start``.
        """
        self.evict_idle()
        entry = self._entries.get(sequence_id)
        if entry is not None and entry.busy:
            raise BadRequest(
                f"sequence {sequence_id!r} already has a request in flight; "
                "send its chunks one after another"
            )
        if not start:
            if entry is None:
                raise BadRequest(
                    f"sequence {sequence_id!r} is not live (never started, ended, or evicted "
                    "after its idle timeout); send sequence_start to begin it"
                )
            if initial is not None:
                raise BadRequest("an initial state may only be given with sequence_start")
        else:
            # A start on a live id restarts it: the old stream is dropped.
            self._entries.pop(sequence_id, None)
            self._make_room()
            state = initial if initial is not None else self._initial_state()
            entry = _Entry(state, self._clock(), fresh=True)
            self._entries[sequence_id] = entry
        entry.busy = True
        entry.last_used = self._clock()
        self._entries.move_to_end(sequence_id)
        return entry.state

    def _busy(self, sequence_id: Hashable) -> _Entry:
        entry = self._entries.get(sequence_id)
        if entry is None or not entry.busy:
            raise ServerFault(f"sequence {sequence_id!r} was not acquired")
        return entry

    def release(self, sequence_id: Hashable, state: State, end: bool = False) -> None:
        """Store the state after the chunk (or free the sequence at ``end``)."""
        entry = self._busy(sequence_id)
        if end:
            del self._entries[sequence_id]
            return
        entry.state, entry.busy, entry.fresh = state, False, False
        entry.last_used = self._clock()

    def cancel(self, sequence_id: Hashable) -> None:
        """The chunk failed: keep the state from before it (a just-started sequence is freed)."""
        entry = self._busy(sequence_id)
        if entry.fresh:
            del self._entries[sequence_id]
        else:
            entry.busy = False
            entry.last_used = self._clock()
