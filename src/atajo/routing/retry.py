"""When to try the same deployment again, and after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from atajo.settings import RetrySettings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    base_s: float = 0.1
    max_s: float = 5.0
    max_retry_after_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, s: RetrySettings) -> RetryPolicy:
        return cls(s.max_retries, s.backoff_base_ms / 1000, s.backoff_max_ms / 1000, s.max_retry_after_s)

    def delay_s(self, retry: int, retry_after_s: float | None = None) -> float | None:
        """Wait before retry number ``retry`` (0-based), or None to move on to the next deployment.

        The provider's Retry-After wins when it gives one we are willing to wait for; otherwise exponential
        back-off with "equal jitter" (half fixed, half random) so a crowd of retries spreads out.
        """
        if retry_after_s is not None:
            return retry_after_s if retry_after_s <= self.max_retry_after_s else None
        cap = min(self.max_s, self.base_s * 2.0**retry)
        return cap / 2 + self.rng.uniform(0, cap / 2)
