"""Before restoring a worker whose weights live in the memory service.

A snapshot taken with ``--weights-from-gms`` carries labels (written by the
reference worker at its checkpoint point; see `warmstart.serve.main`):

* ``gms.layout_hash`` — the hash of the weights it had mapped (structure and
  content digests);
* ``gms.files`` — JSON list of ``{name, size, digest}``;
* ``gms.socket`` and ``model_dir`` — where it found the service and files.

:func:`prepare_restore` runs before CRIU does. It refuses at once when this
node cannot provide identical bytes as far as that can be known without
reading them (service unreachable, a file missing or of another size, another
structure); if the service already holds weights with that layout hash the
re-attach will cost only the mapping; otherwise it asks the service to bring
them in *now*, so loading overlaps the process restore: copied back from the
service's pinned host memory if they are parked there (``gms evict
--keep-host``), else streamed from the files. Content
digests are known only once the bytes are read: a mismatch found then is
reported by :meth:`Prefetch.wait` and refused by the restored worker itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.errors import UsageError, WarmstartError, WeightsMismatch
from warmstart.gms import protocol as P
from warmstart.gms.client import _raise, _recv, connect, status
from warmstart.gms.layout import read_layout

LAYOUT_LABEL = "gms.layout_hash"


@dataclass
class Prefetch:
    layout_hash: str
    #: "resident" (nothing to load), "parked" (copied back from the service's host
    #: memory) or "streaming" (read from the files)
    state: str
    weights_bytes: int = 0
    _thread: threading.Thread | None = None
    _error: list[BaseException] = field(default_factory=list)

    def wait(self, timeout: float | None = None) -> None:
        """Until the service has the weights; raises WeightsMismatch if its bytes differ."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise WarmstartError("the weights are still streaming", hint="wait longer")
        if self._error:
            raise self._error[0]


def expected_files(labels: Mapping[str, str]) -> list[dict[str, object]]:
    try:
        return list(json.loads(labels.get("gms.files", "[]")))
    except ValueError:
        raise UsageError("the snapshot's gms.files label is not JSON") from None


def prepare_restore(labels: Mapping[str, str], *, socket: str | None = None) -> Prefetch | None:
    """See the module docstring; ``None`` when the snapshot holds its own weights."""
    lhash = labels.get(LAYOUT_LABEL)
    if not lhash:
        return None
    sock = socket or labels.get("gms.socket")
    model_dir = labels.get("model_dir")
    if not sock or not model_dir:
        raise UsageError("the snapshot maps weights from a memory service but names no socket or model dir")
    missing = []
    for f in expected_files(labels):
        p = Path(model_dir) / str(f["name"])
        if not p.is_file():
            missing.append(f"{p} (absent)")
        elif p.stat().st_size != f["size"]:
            missing.append(f"{p} ({p.stat().st_size} bytes, the snapshot expects {f['size']})")
    if missing:
        raise WeightsMismatch(
            f"this node cannot provide the weights the snapshot expects: {', '.join(missing)}",
            hint="put the original weight files at the same path, or take a new snapshot",
        )
    reply = status(sock)  # GmsUnavailable if the service is not there
    for e in reply.entries:
        if e.layout_hash == lhash and e.state == "ready":
            return Prefetch(lhash, "resident", e.bytes)
    parked = any(e.layout_hash == lhash and e.state in ("parking", "parked") for e in reply.entries)
    # Attach without mapping (this process needs no CUDA context): the service starts loading
    # and refuses another structure at once; its Ready or Error arrives on this connection.
    layout = read_layout(model_dir)
    conn = connect(sock)
    try:
        P.send(conn, P.Attach(layout=layout, model_dir=str(Path(model_dir).resolve()), expect_hash=lhash))
        reply, fds = _recv(conn, sock, "the prefetch request")
        P.close_fds(fds)
        if isinstance(reply, P.Error):
            _raise(reply)
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    pre = Prefetch(lhash, "parked" if parked else "streaming", layout.total_bytes)

    def follow() -> None:
        try:
            while True:
                msg, fds = _recv(conn, sock, "while streaming the weights")
                P.close_fds(fds)
                if isinstance(msg, P.Error):
                    _raise(msg)
                if isinstance(msg, P.Ready):
                    if msg.layout_hash != lhash:
                        raise WeightsMismatch(f"the weights on this node have layout hash {msg.layout_hash}, "
                                              f"the snapshot expects {lhash}")  # fmt: skip
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            pre._error.append(exc)
        finally:
            conn.close()

    pre._thread = threading.Thread(target=follow, name="gms-prefetch", daemon=True)
    pre._thread.start()
    return pre
