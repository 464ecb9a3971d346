"""The fill order: every chunk once, ahead of faults, pieces complete exactly once."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmstart.host.fillqueue import Chunk, FillQueue

MIB = 1 << 20


def _chunks(keys: int, per_key: int, *, piece_len: int = 3) -> list[Chunk]:
    return [Chunk(k, 0x10000000 + i * MIB, 0x10000000 + (i + 1) * MIB, i // piece_len)
            for k in range(keys) for i in range(per_key)]


@given(st.integers(1, 4), st.integers(1, 40),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0x0F000000, 0x13000000)), max_size=30),
       st.integers(1, 9))
def test_every_chunk_is_taken_once_whatever_the_faults(keys, per_key, faults, every) -> None:
    chunks = _chunks(keys, per_key)
    q = FillQueue(chunks)
    taken: list[Chunk] = []
    pending = list(faults)
    while (c := q.take()) is not None:
        taken.append(c)
        if pending and len(taken) % every == 0:
            q.jump(*pending.pop())
    assert sorted(taken, key=chunks.index) == chunks
    assert q.take() is None


def test_a_fault_moves_the_fill_to_the_faulting_chunk_then_on_in_order() -> None:
    chunks = _chunks(2, 10)
    q = FillQueue(chunks)
    assert q.take() == chunks[0]
    q.jump(1, chunks[15].start + 4096)  # task 1 reads inside its 6th chunk
    assert [q.take() for _ in range(3)] == chunks[15:18]
    q.jump(1, chunks[16].start)  # already taken: on to the next one not taken
    assert q.take() == chunks[18]
    q.jump(7, 0)  # a task without lazy memory changes nothing
    assert q.take() == chunks[19]
    rest = []
    while (c := q.take()) is not None:
        rest.append(c)
    assert rest == chunks[1:15]  # what the jump skipped, from the lowest


def test_a_fault_in_a_gap_goes_to_the_next_chunk() -> None:
    chunks = [Chunk(1, 0, MIB), Chunk(1, 4 * MIB, 5 * MIB), Chunk(1, 8 * MIB, 9 * MIB)]
    q = FillQueue(chunks)
    q.jump(1, 2 * MIB)
    assert q.take() == chunks[1]
    q.jump(1, 20 * MIB)  # past the last chunk: no jump
    assert q.take() == chunks[2]


def test_a_piece_is_complete_once_its_last_chunk_is_done() -> None:
    chunks = _chunks(1, 7)  # pieces 0 (3 chunks), 1 (3), 2 (1)
    q = FillQueue(chunks)
    done = [q.done(c) for c in [chunks[1], chunks[0], chunks[6], chunks[2], chunks[4], chunks[3], chunks[5]]]
    assert done == [False, False, True, True, False, False, True]


def test_threads_share_the_chunks_without_losing_or_repeating_one() -> None:
    chunks = _chunks(3, 500)
    q = FillQueue(chunks)
    got: list[list[Chunk]] = [[] for _ in range(8)]

    def worker(i: int) -> None:
        while (c := q.take()) is not None:
            got[i].append(c)
            if len(got[i]) % 17 == 0:
                q.jump(c.key, c.start + 50 * MIB)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [c for g in got for c in g]
    assert len(flat) == len(chunks) and set(map(id, flat)) == set(map(id, chunks))


def test_chunks_out_of_address_order_are_refused() -> None:
    with pytest.raises(ValueError, match="address order"):
        FillQueue([Chunk(1, 2 * MIB, 3 * MIB), Chunk(1, 0, MIB)])
