"""Fuzz the parsers of what a remote store hands us: envelope, index, public keys.

Whatever the bytes, the parsers either return a valid object or raise one
clear, one-line error of the warmstart hierarchy; nothing else escapes.
"""

from __future__ import annotations

import datetime as dt
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmstart.errors import SnapshotCorrupt, UsageError
from warmstart.store.chunking import ChunkParams, chunks
from warmstart.store.index import (
    ChunkRef,
    Envelope,
    FileRef,
    SnapshotIndex,
    check_relpath,
    parse_envelope,
    parse_index,
)
from warmstart.store.signing import PublicKey

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udfffb", "0" * 64, "2026-01-01T00:00:00"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _valid_index() -> SnapshotIndex:
    d = "ab" * 32
    return SnapshotIndex(
        name="w",
        snapshot_id="s1",
        created_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        pushed_at=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
        pushed_from="h",
        files=[
            FileRef(path="manifest.json", size=10, chunks=[ChunkRef(digest=d, size=10)]),
            FileRef(path="images/pages-1.img", size=30, chunks=[ChunkRef(digest=d, size=10), ChunkRef(digest="cd" * 32, size=20)]),
        ],
    )


def _is_clear(exc: Exception) -> bool:
    msg = str(exc)
    return "\n" not in msg and 0 < len(msg) < 600


@SETTINGS
@given(st.binary(max_size=2000))
def test_envelope_from_random_bytes(data: bytes) -> None:
    try:
        parse_envelope(data)
    except SnapshotCorrupt as exc:
        assert _is_clear(exc)


@SETTINGS
@given(json_values)
def test_index_from_random_json(value: object) -> None:
    for parse in (parse_index, parse_envelope):
        try:
            parse(json.dumps(value).encode())
        except SnapshotCorrupt as exc:
            assert _is_clear(exc)


def _mutations() -> st.SearchStrategy:
    base = json.loads(_valid_index().to_bytes())
    paths = [("name",), ("snapshot_id",), ("created_at",), ("files",), ("files", 0, "path"),
             ("files", 1, "size"), ("files", 1, "chunks"), ("files", 1, "chunks", 0, "digest"),
             ("files", 1, "chunks", 1, "size"), ("files", 0, "mode"), ("format_version",), ("hash",)]  # fmt: skip
    return st.tuples(st.just(base), st.sampled_from(paths), json_values | st.just("../../etc/passwd"))


@SETTINGS
@given(_mutations(), st.booleans())
def test_index_with_one_field_changed(case: tuple, delete: bool) -> None:
    base, path, value = case
    doc = json.loads(json.dumps(base))
    node = doc
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    try:
        idx = parse_index(json.dumps(doc).encode())
    except SnapshotCorrupt as exc:
        assert _is_clear(exc)
        return
    # whatever parsed is still self-consistent and safe to write
    for f in idx.files:
        assert sum(c.size for c in f.chunks) == f.size
        check_relpath(f.path)
        assert not f.path.startswith("/") and ".." not in f.path.split("/")


def test_lone_surrogates_are_refused_cleanly() -> None:
    env = b'{"format": "warmstart-index/1", "index": "\\ud800", "signature": null}'
    try:
        parse_envelope(env).parse_index()
    except SnapshotCorrupt as exc:
        assert "UTF-8" in str(exc)
    else:
        raise AssertionError("accepted")
    try:
        parse_index(b'{"format_version": 1, "name": "\\udfff"}')
    except SnapshotCorrupt as exc:
        assert _is_clear(exc)


def test_valid_index_round_trips() -> None:
    idx = _valid_index()
    assert parse_index(idx.to_bytes()) == idx
    env = Envelope(index=idx.to_bytes().decode())
    assert parse_envelope(env.to_bytes()).parse_index() == idx


@SETTINGS
@given(st.text(max_size=300))
def test_public_key_parser(text: str) -> None:
    try:
        key = PublicKey.parse(text, source="k.pub")
    except UsageError as exc:
        assert _is_clear(exc)
    else:
        assert len(key.raw) == 32


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300_000), st.sampled_from([4096, 8192, 65536]))
def test_chunks_cover_the_input_exactly(data: bytes, avg: int) -> None:
    params = ChunkParams.around(avg)
    pieces = list(chunks(io.BytesIO(data), ChunkParams(avg=params.avg, min=params.min, max=params.max, read_block=8192)))
    assert b"".join(pieces) == data
    assert all(0 < len(p) <= params.max for p in pieces)
    assert all(len(p) >= params.min for p in pieces[:-1])


_TRUST: dict[str, object] = {}


def _trust():  # type: ignore[no-untyped-def]
    if not _TRUST:
        import tempfile
        from pathlib import Path

        from warmstart.store.signing import SigningKey, TrustPolicy, generate

        d = Path(tempfile.mkdtemp())
        key, pub, public = generate("k", d)
        _TRUST.update(policy=TrustPolicy.from_sources([pub]), key=SigningKey.load(key), kid=public.key_id)
    return _TRUST


@SETTINGS
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=120),
       st.booleans(), st.binary(max_size=200))
def test_signature_check_never_crashes(value: str, known: bool, index: bytes) -> None:
    from warmstart.errors import Untrusted
    from warmstart.store.index import Signature

    t = _trust()
    raw = {"format": "warmstart-index/1", "index": index.decode("latin-1"),
           "signature": {"algorithm": "ed25519", "key_id": t["kid"] if known else "0" * 16, "value": value}}  # fmt: skip
    try:
        env = parse_envelope(json.dumps(raw).encode())
    except SnapshotCorrupt:
        return
    try:
        t["policy"].check(env, what="fuzzed")
    except Untrusted as exc:
        assert _is_clear(exc)
    else:
        raise AssertionError("a random signature verified")
    # and the real signature over the same bytes does verify
    good = Envelope(index=env.index, signature=t["key"].sign(env.index.encode()))
    assert t["policy"].check(good, what="signed").trusted
    assert isinstance(good.signature, Signature)
