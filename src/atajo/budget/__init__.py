"""Budgets: money and tokens per key, tenant or globally, per day or month, reserved before a call and
reconciled after it (``budgets.py``), held in this process (``memory.py``) or in Redis (``redis.py``)."""
