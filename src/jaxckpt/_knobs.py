"""Tunables, in one place. Tests override them with ``monkeypatch.setattr``."""

# Seconds the interpreter-exit hook waits for each pending async save
# (TF's async helper waits 300 s).
EXIT_TIMEOUT_S: float = 300.0

# Seconds the background save thread lingers without work before exiting.
WORKER_IDLE_S: float = 10.0

# Seconds an async save's staging buffers (see _staging.py) are kept for the
# next save before they are freed.
STAGING_IDLE_S: float = 600.0

# Age after which a CheckpointManager deletes unreferenced data on memory://,
# s3:// and gs:// (younger data may belong to a save in flight in another
# process; see _store.KvStore.remove_leftovers).
KV_LEFTOVER_AGE_S: float = 6 * 3600.0

# Multi-process operations (saves, restores) whose coordination-service keys
# are kept; older ones are deleted (see _multihost.sweep_keys).
COORDINATION_KEEP_OPS: int = 1000

# Name of the TF-format text state file written next to ``save()``'d checkpoints.
STATE_FILE_NAME: str = "checkpoint"

# On-disk layout inside one checkpoint directory. ``STATE_ITEM`` is a plain
# Orbax PyTree checkpoint; ``MANIFEST_ITEM`` holds jaxckpt's own metadata.
STATE_ITEM: str = "state"
MANIFEST_ITEM: str = "jaxckpt"

# Format version written into every manifest; readers refuse newer versions.
# Version 2 adds the manifest's own checksum; version 1 manifests are still read.
# Version 3 adds packed small arrays (_packed.py); it is written only for
# checkpoints that have them.
FORMAT_VERSION: int = 3

# Seconds `checkpoints_iterator` sleeps between looks at the state file (TF: 1).
POLL_INTERVAL_S: float = 1.0

# Local-tier files carry one CRC-32 per block of this many bytes, so that
# writing and checking them runs on all cores.
LOCAL_CRC_BLOCK: int = 8 << 20
