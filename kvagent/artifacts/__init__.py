"""A KV as bytes: the artifact format (:mod:`.format`), its codecs, its signatures, and the records of where a
published artifact comes from (:mod:`.source`)."""
