"""What a budget store does: counters changed atomically, several at once.

A counter holds what was spent plus what is reserved in one window of one budget. ``reserve`` adds every
amount only if each counter stays within its limit, else changes nothing; ``adjust`` adds (possibly negative)
amounts unconditionally, for reconciling a reservation with the actual cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Charge:
    key: str
    """The counter: budget, subject, window and unit."""
    amount: int
    limit: int
    ttl_s: int
    """The counter may be forgotten this long after the change (past the end of its window)."""


@dataclass(frozen=True, slots=True)
class Reserved:
    """``refused``: the index of the first charge that did not fit (None: all were added); ``values``: each
    counter after the call (for a refusal: as it stands, unchanged)."""

    refused: int | None
    values: tuple[int, ...]


class BudgetStore(Protocol):
    async def reserve(self, charges: Sequence[Charge]) -> Reserved: ...

    async def adjust(self, charges: Sequence[Charge]) -> tuple[int, ...]: ...

    async def values(self, keys: Sequence[str]) -> tuple[int, ...]: ...

    async def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The store could not be reached (or answered too slowly)."""
