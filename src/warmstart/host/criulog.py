"""Turn a CRIU log into the one line that explains a failure.

CRIU logs hundreds of lines; the cause is usually one ``Error (file:line):``
line, sometimes with a hint a few lines earlier. Known causes map to a message
that says what to do; unknown ones fall back to the first error line verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ERROR = re.compile(r"^\(?[\d. ]*\)?\s*(?:\d+:\s*)?Error \((?P<where>[^)]*)\):\s*(?P<text>.*)$")


@dataclass(frozen=True)
class Diagnosis:
    message: str
    hint: str | None
    line: str | None


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    message: str
    hint: str | None


def _rule(pattern: str, message: str, hint: str | None = None) -> _Rule:
    return _Rule(re.compile(pattern), message, hint)


_RULES: tuple[_Rule, ...] = (
    _rule(
        r"Connected TCP socket|tcp-established",
        "the tree has an established TCP connection",
        "close it before the checkpoint, or pass --tcp-established (or --tcp-close)",
    ),
    _rule(
        r"io_uring",
        "the tree uses io_uring, which CRIU cannot checkpoint",
        "disable io_uring in the workload before its checkpoint point",
    ),
    _rule(
        r"/dev/nvidia|nvidia",
        "a process still holds NVIDIA device files",
        "its GPU state must be checkpointed first; check `warmstart doctor` for driver support",
    ),
    _rule(
        r"External socket is used|ext-unix-sk",
        "the tree has a unix socket connected to a process outside it",
        "pass --ext-unix-sk or checkpoint the peer too",
    ),
    _rule(
        r"shell-job|attached to shell terminal|dangling tty",
        "the tree is attached to a terminal",
        "pass --shell-job, or start the workload without a terminal (setsid, stdio to files)",
    ),
    _rule(
        r"ghost.*(limit|too big)|increase limit",
        "the tree holds a deleted file larger than the ghost-file limit",
        "raise --ghost-limit",
    ),
    _rule(
        r"vDSO area bounds|vdso",
        "this CRIU does not understand the kernel's vDSO layout",
        "install CRIU >= 4.1 with scripts/install-criu.sh",
    ),
    _rule(
        r"Can't fork for (\d+).*File exists|PID (\d+) .* in use|clone3.*File exists|set_next_pid",
        "a PID the snapshot needs is already in use on this host",
        "stop the process holding it (an earlier restore of this snapshot?) and retry",
    ),
    _rule(
        r"No such process|seize.*failed|Can't seize",
        "a process of the tree went away during the checkpoint",
        "check that the workload is running, then retry",
    ),
    _rule(
        r"sockets: Can't get \d+:\d+ opt",
        "CRIU cannot read a socket's options on this kernel (TCP sockets: CRIU 4.1.1 on "
        "Linux 6.18)",
        "close TCP sockets before the checkpoint point, or use a kernel/CRIU pair that can",
    ),
    _rule(
        r"No space left on device",
        "the snapshot store ran out of space",
        "free space in the store or choose another with --store",
    ),
    _rule(
        r"File .* has bad size",
        "a file the tree has open changed size since the checkpoint (often a log file that "
        "an earlier restore of this snapshot appended to)",
        "restore needs each open regular file as it was: send worker logs to a pipe or the "
        "console, or put back the file's checkpoint-time contents",
    ),
    _rule(
        r"Operation not permitted|EPERM|Permission denied",
        "CRIU was refused a privileged operation",
        "run warmstart as root (or with CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE)",
    ),
    _rule(
        r"[Mm]ount|mnt:",
        "CRIU could not handle a mount of the tree",
        "see the log; container mounts must be passed as external",
    ),
)


#: Error lines CRIU logs and then carries on from: never the cause of a failure.
_BENIGN = re.compile(r"rlimit: Can't setup RLIMIT_NOFILE")


def error_lines(text: str) -> list[str]:
    out = []
    for raw in text.splitlines():
        m = _ERROR.match(raw.strip())
        if m and not _BENIGN.search(m["text"]):
            out.append(f"{m['where']}: {m['text'].strip()}")
    return out


def diagnose(text: str) -> Diagnosis:
    """The most useful explanation of a failed CRIU run, from its log text."""
    errors = error_lines(text)
    haystacks = errors or [line for line in text.splitlines() if line.strip()][-20:]
    for rule in _RULES:
        for line in haystacks:
            if rule.pattern.search(line):
                return Diagnosis(rule.message, rule.hint, line)
    if errors:
        return Diagnosis(f"CRIU failed: {errors[0]}", None, errors[0])
    return Diagnosis("CRIU failed without an error line in its log", None, None)


def diagnose_file(path: Path) -> Diagnosis:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return Diagnosis("CRIU failed and left no log", None, None)
    return diagnose(text)
