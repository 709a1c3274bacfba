"""What the local upstreams share: a script of faults for the next requests."""

from __future__ import annotations

from collections import deque
from typing import ClassVar, Generic, TypeVar

F = TypeVar("F")


class FaultScript(Generic[F]):
    """Faults queued for the next requests, in order; then ``always``, or a normal answer (``fault_type()``).

    Subclasses are dataclasses that declare ``faults`` and ``always`` as fields.
    """

    fault_type: ClassVar[type]
    faults: deque[F]
    always: F | None

    def fail_next(self, *faults: F) -> None:
        self.faults.extend(faults)

    def _fault(self) -> F:
        if self.faults:
            return self.faults.popleft()
        if self.always is not None:
            return self.always
        fault: F = self.fault_type()
        return fault
