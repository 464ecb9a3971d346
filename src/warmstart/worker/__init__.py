"""The worker SDK: the small API an inference engine calls to be snapshot-able.

* `checkpoint_point` -- between engine init (phase 1) and serving (phase 2);
* `on_restore` / `was_restored` / `restore_context` -- react to being a restored copy;
* `Registrar`, `FileRegistrar`, `Identity` -- phase 2 service registration.
"""

from warmstart.worker.checkpoint import (
    BadRestoreContext,
    Coordinator,
    ForeignSnapshot,
    Outcome,
    checkpoint_point,
    on_restore,
    restore_context,
    was_restored,
)
from warmstart.worker.preflight import NotCheckpointable, apply_checkpoint_env, check_checkpointable
from warmstart.worker.registrar import FileRegistrar, Identity, NullRegistrar, Registrar

__all__ = [
    "BadRestoreContext",
    "Coordinator",
    "FileRegistrar",
    "ForeignSnapshot",
    "Identity",
    "NotCheckpointable",
    "NullRegistrar",
    "Outcome",
    "Registrar",
    "apply_checkpoint_env",
    "check_checkpointable",
    "checkpoint_point",
    "on_restore",
    "restore_context",
    "was_restored",
]
