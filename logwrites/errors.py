"""The errors logwrites raises on purpose: one root, facts as attributes, one-line messages.

Only `logwrites.cli` turns them into exit statuses; everything below raises.
"""


class LogwritesError(Exception):
    """Root of every error we raise on purpose."""


class UsageError(LogwritesError):
    """The user asked for something that cannot be done as asked (exit 2)."""


class LogFormatError(LogwritesError):
    """A log is damaged or not a dm-log-writes log; `index` names the entry where it breaks.

    `index` is -1 for the super block.
    """

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(index, problem)
        self.index, self.problem = index, problem

    def __str__(self) -> str:
        if self.index < 0:
            return f"log super block: {self.problem}"
        return f"log entry {self.index}: {self.problem}"


class CheckFailed(LogwritesError):
    """A check ran and said no (exit 1), as opposed to an input that could not be used."""


class NoRoom(LogwritesError):
    """The filesystem holding the crash states filled up (or hit its quota): every later state
    would fail the same way, so the loop stops rather than report each as unchecked."""
