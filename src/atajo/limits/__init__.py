"""Admission: how many requests and tokens each key, tenant, model and the whole gateway may use (GCRA, in
this process or in Redis), the adaptive multipliers on those limits, and the per-deployment concurrency cap.
When and whether admission happens is ``stages/ratelimit.py``'s business."""
