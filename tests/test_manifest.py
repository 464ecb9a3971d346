"""The manifest round-trips and rejects what it must."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart.errors import SnapshotCorrupt
from warmstart.snapshot.manifest import (
    FileEntry,
    GpuProcess,
    HostInfo,
    Manifest,
    PhaseTiming,
    ProcessInfo,
    ProcessTree,
)

text = st.text(min_size=1, max_size=40)
small = st.integers(min_value=0, max_value=2**62)
pids = st.integers(min_value=1, max_value=2**22)

hosts = st.builds(
    HostInfo, hostname=text, kernel=text, arch=text, cpu_model=text,
    cpu_flags=st.lists(text, max_size=5), criu_version=text,
)  # fmt: skip
procs = st.builds(ProcessInfo, pid=pids, ppid=pids, name=text, threads=small, rss_bytes=small)
trees = st.builds(ProcessTree, root_pid=pids, processes=st.lists(procs, max_size=4), cmdline=st.lists(text, max_size=4))
files = st.builds(FileEntry, path=text, size=small, digest=text)
gpus = st.builds(
    GpuProcess, pid=pids, gpu_uuid=text, gpu_model=text, gpu_index=st.none() | small,
    driver_version=text, cuda_driver_api=st.none() | small, device_memory_bytes=small,
)  # fmt: skip
timings = st.builds(PhaseTiming, name=text, seconds=st.floats(0, 1e6), bytes=st.none() | small)
manifests = st.builds(
    Manifest,
    snapshot_id=text,
    name=text,
    created_at=st.datetimes(timezones=st.just(dt.UTC)),
    source=hosts,
    tree=trees,
    files=st.lists(files, max_size=5),
    gpus=st.lists(gpus, max_size=3),
    timings=st.lists(timings, max_size=5),
    criu_options=st.dictionaries(text, st.booleans() | small | text, max_size=3),
    labels=st.dictionaries(text, text, max_size=3),
)


@given(manifests)
@settings(max_examples=200, deadline=None)
def test_round_trip(m: Manifest) -> None:
    assert Manifest.from_json(m.to_json()) == m


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@settings(max_examples=300, deadline=None)
def test_garbage_is_a_clean_error(data: bytes) -> None:
    try:
        Manifest.from_json(data)
    except SnapshotCorrupt as exc:
        assert "\n" not in str(exc)


@given(manifests, st.sampled_from(["snapshot_id", "source", "tree", "files", "created_at"]))
@settings(max_examples=50, deadline=None)
def test_missing_field_is_named(m: Manifest, field: str) -> None:
    raw = json.loads(m.to_json())
    del raw[field]
    with pytest.raises(SnapshotCorrupt, match=field):
        Manifest.from_json(json.dumps(raw))


def test_unknown_field_refused() -> None:
    raw = {"format_version": 1, "surprise": True}
    with pytest.raises(SnapshotCorrupt):
        Manifest.from_json(json.dumps(raw))


def test_a_stopped_timer_keeps_its_total() -> None:
    import time

    from warmstart.snapshot.timing import Timer

    timer = Timer()
    with timer.phase("work"):
        time.sleep(0.01)
    timer.stop()
    total = timer.total
    time.sleep(0.05)
    assert timer.total == total >= 0.01
