"""digest_file: one read for small files, chunks for big ones, the same digest either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from warmstart.store import integrity


@pytest.mark.parametrize(
    "size", [0, 1, 4096, integrity._SMALL, integrity._SMALL + 1, 3 * integrity._CHUNK + 5]
)
def test_digest_is_xxh3_of_every_byte(tmp_path: Path, size: int) -> None:
    data = os.urandom(min(size, 1 << 16)) * (size // (1 << 16) + 1)
    data = data[:size]
    path = tmp_path / "f"
    path.write_bytes(data)
    assert integrity.digest_file(path) == (size, f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}")
