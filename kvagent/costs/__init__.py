"""What a path costs and whether it pays: the pure policy, market prices, the per-read stage clock, the
machine's calibration and the registry breaker."""
