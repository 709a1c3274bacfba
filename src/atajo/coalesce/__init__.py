"""Single-flight: identical requests in flight share one upstream call (micro-batching joins in a later issue)."""
