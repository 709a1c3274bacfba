"""Typed objects every stage and mechanism speaks: requests, results, the request context, the pipeline."""
