"""The KV itself: its tensors (:mod:`.tensors`), its identity (:mod:`.identity`: keys and block hashes) and
digests (:mod:`.hashing`). Imports nothing else of kvagent but errors."""
