"""Errors the driver raises for outcomes that are expected on a real cluster, kept free of Ray imports so
the CLI can turn them into a message and an exit code without importing the driver."""


def first_line(err: BaseException) -> str:
    """'Type: the message's first line': an error said in one line of a CLI message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def counted(n: int, noun: str) -> str:
    """'1 cell', '2 cells': the driver's and the CLI's messages count in one grammar."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


class SweepStoppedError(RuntimeError):
    """Cells are left that cannot run now; what finished is stored and a rerun resumes."""


class ClusterShrankError(SweepStoppedError):
    """Cells are left that no worker can take any more (a node died)."""


class WorkersNotStartingError(SweepStoppedError):
    """Cells wait on workers that do not start: no node for them arrived in time, or they die starting."""


class StoreUnreadableError(SweepStoppedError):
    """A stored row of the sweep could not be read mid-run (an object store's hiccup): its cell must not
    look unrun, or it would run again over the row."""


class StoreWriteError(SweepStoppedError):
    """A finished cell's row could not be written, tried again after waits: the store is full, read-only or gone."""


class ClusterUnreachableError(SweepStoppedError):
    """`--address` names no Ray cluster this driver can join; nothing ran."""


# added to the KeyboardInterrupt of a second Ctrl-C while finished rows were being stored (driver._held_until_stored):
# the CLI's last line must not say every finished row is stored
ROWS_LOST_NOTE = "finished rows were not stored (a second interrupt while storing them; their cells run again)"
