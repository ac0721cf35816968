"""Analyses beside the runtime: models of what reuse costs, for papers and planning (``kvagent economics``).

Nothing in the runtime imports this package.
"""
