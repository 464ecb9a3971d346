"""The one error hierarchy of warmstart.

Every error a user can cause or meet carries a one-line ``message`` that names
what is wrong and, where there is one, a ``hint`` saying what to do. The CLI
prints ``error: <message> — <hint>`` and exits with ``exit_code``; it never
prints a traceback for a ``WarmstartError``.
"""

from __future__ import annotations


class WarmstartError(Exception):
    """Base class. ``str(err)`` is the full one-line message."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(WarmstartError):
    """The request itself is wrong: bad argument, unknown PID, name taken."""

    exit_code = 2


class NotFoundError(UsageError):
    """A named thing (snapshot, process, container, key) does not exist."""


class PermissionError_(WarmstartError):
    """warmstart needs a privilege this process does not have."""

    exit_code = 77


class EnvironmentProblem(WarmstartError):
    """The host lacks something warmstart needs (CRIU, a kernel feature, a driver)."""

    exit_code = 69


class CriuError(WarmstartError):
    """CRIU failed; ``log`` is the path of its log, ``cause`` the line that explains it."""

    def __init__(
        self, message: str, *, hint: str | None = None, log: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.log = log


class GpuError(WarmstartError):
    """A CUDA driver call failed."""


class NoGpuDriver(EnvironmentProblem):
    """No NVIDIA driver with the checkpoint API on this host."""


class StoreError(WarmstartError):
    """The snapshot store cannot be read or written."""


class SnapshotCorrupt(StoreError):
    """A snapshot fails its manifest or checksum checks."""

    exit_code = 65


class Incompatible(WarmstartError):
    """A snapshot cannot be restored here (GPU model, driver, CPU, kernel)."""

    exit_code = 65


class Cancelled(WarmstartError):
    """The operation was cancelled; nothing it started is left behind."""

    exit_code = 130


class GmsUnavailable(EnvironmentProblem):
    """The node's GPU memory service cannot be reached (not running, wrong socket, timed out)."""


class WeightsMismatch(Incompatible):
    """The GPU memory service holds (or would load) weights other than the ones expected."""


class Untrusted(WarmstartError):
    """A snapshot is unsigned, wrongly signed, or signed by a key this node does not trust."""

    exit_code = 65


def kind_of(exc: WarmstartError) -> str:
    """The name of the nearest class of this module in ``exc``'s MRO (for the wire)."""
    for cls in type(exc).__mro__:
        if globals().get(cls.__name__) is cls:
            return cls.__name__
    return "WarmstartError"


def from_kind(kind: str | None, message: str, hint: str | None = None) -> WarmstartError:
    """The error ``kind_of`` named, rebuilt on the other side of the wire."""
    cls = globals().get(kind or "")
    if not (isinstance(cls, type) and issubclass(cls, WarmstartError)):
        cls = WarmstartError
    try:
        return cls(message, hint=hint)
    except TypeError:  # a class with another signature
        return WarmstartError(message, hint=hint)
