"""Measuring the gateway: Prometheus metrics (and, in later work, the ledger, detectors and alerts)."""
