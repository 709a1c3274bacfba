"""The deferred lane's storage: files and batches, per tenant, in SQLite or PostgreSQL."""
