"""What ``dldkd validate`` prints: one named :class:`Check` per line (OK / WARN / FAIL, with a
message that names the key, the value and what to do), then the memory estimate and a tally."""
from __future__ import annotations

from dataclasses import dataclass

from launch.validate.memory import MemoryEstimate

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: str       # OK | WARN | FAIL
    message: str


@dataclass
class Report:
    checks: list[Check]
    memory: MemoryEstimate | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{c.status:<4}  {c.name:<{width}}  {c.message}" for c in self.checks]
        if self.memory is not None:
            lines += ["", self.memory.render()]
        fails = sum(c.status == FAIL for c in self.checks)
        warns = sum(c.status == WARN for c in self.checks)
        lines += ["", f"{fails} failed, {warns} warnings, {len(self.checks) - fails - warns} ok"]
        return "\n".join(lines)
