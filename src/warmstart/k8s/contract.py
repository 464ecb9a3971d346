"""The names everything on the Kubernetes side agrees on.

Workload opt-in (on the pod template of a Deployment/StatefulSet):

* label ``warmstart.dev/workload: <name>`` — required; groups the pods whose snapshots are
  interchangeable. Only pods with this label are watched.
* annotation ``warmstart.dev/checkpoint: when-ready`` — "checkpoint me once I am
  checkpoint-ready" (the worker wrote ``ready-for-snapshot``). One snapshot is taken per
  workload and *compatibility class* (GPU model, driver, image digest, arch); ``never`` opts out
  of the automatic snapshot after a cold start.
* annotation ``warmstart.dev/restore: latest | <snapshot name>`` — "restore me from the newest
  compatible snapshot of this workload / from that snapshot". The restored container must run
  the placeholder (see below). ``latest`` also means: if nothing compatible exists, cold-start
  and snapshot this pod once it is checkpoint-ready (unless ``checkpoint: never``).
* annotation ``warmstart.dev/container: <name>`` — the container to checkpoint/restore
  (default: the first container).

Written by the node agent (never by users):

* annotation ``warmstart.dev/compat-key`` — the pod's compatibility class on its node.
* annotation ``warmstart.dev/restore-status`` — JSON
  :class:`~warmstart.k8s.resources.RestoreStatus`.

Placeholder contract (``warmstart placeholder -- <original command...>``), all files in
``$SNAPSHOT_CONTROL_DIR`` (an ``emptyDir`` of this pod; see :mod:`warmstart.protocol`):

1. The placeholder starts as the container's main process, does nothing, and waits.
2. The node daemon writes ``restore-started`` when it begins restoring into the container,
   then restores the snapshot's process tree into the container's namespaces. The placeholder
   stays the container's init: the restored tree is reparented to it, and when the restored
   root process exits the placeholder exits with its status. When the restored worker may
   resume, the checkpointer writes ``restore-context.json`` then ``restore-complete``.
3. The agent writes ``cold-start`` (body: one line, the reason) when there is nothing
   compatible to restore or the restore failed. The placeholder then ``exec``s the original
   command: the pod cold-starts by itself. After ``restore-complete`` it never does.
4. If neither ``restore-started`` nor ``cold-start`` appears within
   ``WARMSTART_PLACEHOLDER_DEADLINE`` seconds (default 120; the agent may be down), the
   placeholder writes ``cold-start`` itself and execs the original command. Once
   ``restore-started`` exists, it waits up to ``WARMSTART_RESTORE_DEADLINE`` seconds (default
   600) for ``restore-complete`` or ``cold-start``, then does the same.
5. Startup probe: passes when ``restore-complete`` or ``cold-start`` exists, i.e. a restored
   pod is "started" only when the restore completed. Readiness stays the worker's own probe.
"""

from __future__ import annotations

GROUP = "warmstart.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Snapshot"
PLURAL = "snapshots"

LABEL_WORKLOAD = f"{GROUP}/workload"
#: On Snapshot objects: the node whose agent performs the checkpoint.
LABEL_NODE = f"{GROUP}/node"
#: On Snapshot objects: a short hash of the compatibility class.
LABEL_COMPAT = f"{GROUP}/compat"
#: On Snapshot objects the controller created (vs. ones users wrote).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "warmstart-controller"

ANN_CHECKPOINT = f"{GROUP}/checkpoint"
ANN_RESTORE = f"{GROUP}/restore"
ANN_CONTAINER = f"{GROUP}/container"
ANN_COMPAT_KEY = f"{GROUP}/compat-key"
ANN_RESTORE_STATUS = f"{GROUP}/restore-status"

CHECKPOINT_WHEN_READY = "when-ready"
CHECKPOINT_NEVER = "never"
RESTORE_LATEST = "latest"

#: Placeholder files in $SNAPSHOT_CONTROL_DIR (besides those of warmstart.protocol).
PLACEHOLDER_RESTORE_STARTED = "restore-started"
PLACEHOLDER_COLD_START = "cold-start"
PLACEHOLDER_DEADLINE_ENV = "WARMSTART_PLACEHOLDER_DEADLINE"
RESTORE_DEADLINE_ENV = "WARMSTART_RESTORE_DEADLINE"
