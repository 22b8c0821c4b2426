"""Service: the daemon's life cycle, its API server, the desired-state store,
metrics and flow logs."""
