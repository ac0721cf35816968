"""One resolver over the tiers (:mod:`.resolver`), what a read did (:mod:`.info`), and its account
(:mod:`.accounting`)."""
