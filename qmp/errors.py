"""Errors of the QEMU layer; light on purpose so that `logwrites.cli` can map them to exit
statuses without importing qemu.qmp."""

from __future__ import annotations

from logwrites.errors import LogwritesError


class MachineError(LogwritesError):
    """QEMU could not be started, driven or waited for; `console_tail` holds the guest's last
    console lines when they explain it."""

    def __init__(self, problem: str, console_tail: str = "") -> None:
        super().__init__(problem, console_tail)
        self.problem, self.console_tail = problem, console_tail

    def __str__(self) -> str:
        return self.problem


class KernelPanic(MachineError):
    """The guest kernel panicked; `console_tail` ends with the panic (exit status 3)."""

    def __init__(self, console_tail: str) -> None:
        panic = next((line.strip() for line in console_tail.splitlines()
                      if "Kernel panic" in line), "Kernel panic")
        super().__init__(f"guest {panic[panic.index('Kernel panic'):]}"
                         if "Kernel panic" in panic else "guest kernel panic", console_tail)


class AgentError(MachineError):
    """The guest agent reported a failure of its own (no disk, no channel, bad job)."""
