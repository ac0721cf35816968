"""A prompt turn over the resolver and an engine (:mod:`.turn`), the chat template (:mod:`.prompt`), tool
calls (:mod:`.tools`) and guided decoding (:mod:`.guided`)."""
