"""Snapshot models, compatibility rules, settings from the environment."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmstart.errors import UsageError
from warmstart.k8s.resources import (
    Compat,
    Phase,
    SnapshotStatus,
    image_digest,
    snapshot_name_for,
    status_of,
)
from warmstart.k8s.settings import AgentSettings, ControllerSettings

H100 = Compat(arch="x86_64", gpu_model="NVIDIA H100", driver_version="580.65.06",
              image_digest="sha256:aaa")


def test_compat_key_round_trips_and_names_the_first_mismatch():
    assert Compat.from_key(H100.key()) == H100
    assert Compat.from_key("garbage") is None
    assert H100.mismatch(H100) is None
    other = H100.model_copy(update={"driver_version": "550.1"})
    assert H100.mismatch(other) == "driver_version '550.1' != '580.65.06'"
    other = other.model_copy(update={"image_digest": "sha256:bbb"})
    assert H100.mismatch(other).startswith("image_digest")  # image first: most common


def test_image_digest():
    assert image_digest("docker.io/x/y@sha256:abc") == "sha256:abc"
    assert image_digest("sha256:abc") == "sha256:abc"


@given(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,80}[a-z0-9])?", fullmatch=True))
def test_snapshot_names_are_valid_object_names(workload):
    name = snapshot_name_for(workload, H100)
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name), name
    assert name == snapshot_name_for(workload, H100)  # deterministic
    assert name != snapshot_name_for(workload, H100.model_copy(update={"arch": "arm64"}))


def test_status_parses_wire_names_and_defaults():
    st_ = status_of({"status": {"phase": "Ready", "sizeBytes": 5, "gpuModel": "H100"}})
    assert st_.phase is Phase.READY and st_.size_bytes == 5 and st_.gpu_model == "H100"
    assert status_of({}).phase is Phase.PENDING


def test_condition_transition_time_changes_only_on_transition():
    s = SnapshotStatus()
    s.set_condition("Ready", False, "Waiting")
    first = s.conditions[0].last_transition_time
    s.conditions[0].last_transition_time = "2000-01-01T00:00:00Z"
    s.set_condition("Ready", False, "StillWaiting")
    assert s.conditions[0].last_transition_time == "2000-01-01T00:00:00Z"
    s.set_condition("Ready", True, "Done")
    assert s.conditions[0].last_transition_time != "2000-01-01T00:00:00Z"
    assert len(s.conditions) == 1 and first


def test_agent_settings_need_a_node_name(monkeypatch):
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(UsageError, match="NODE_NAME is not set"):
        AgentSettings.from_env()


def test_bad_integer_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "n1")
    monkeypatch.setenv("WARMSTART_MAX_PARALLEL_RESTORES", "many")
    with pytest.raises(UsageError) as exc:
        AgentSettings.from_env()
    assert "WARMSTART_MAX_PARALLEL_RESTORES='many' is not an integer" in str(exc.value)
    monkeypatch.setenv("WARMSTART_CONTROLLER_WORKERS", "x")
    with pytest.raises(UsageError):
        ControllerSettings.from_env()
