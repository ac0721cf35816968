"""Where a KV may be found: this process's memory, the local store, a registry (found, bought, verified), and
the records of a walk through them (:mod:`.lookup`)."""
