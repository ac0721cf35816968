"""The HTTP client of a kvagent registry: artifacts, the market, remote generation."""
