"""Which deployment serves a request: the model table, retry policy, and per-deployment circuit breakers."""
