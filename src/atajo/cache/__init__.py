"""How caching works: entries, tier backends (memory, Redis, SQL), the tier chain and invalidation.

Nothing here knows OpenAI's wire format or the pipeline: ``stages/cache.py`` decides when to look up and
store, this package decides how.
"""
