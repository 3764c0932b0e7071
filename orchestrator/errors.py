"""Errors the driver raises for outcomes that are expected on a real cluster, kept free of Ray imports so
the CLI can turn them into a message and an exit code without importing the driver."""


class SweepStoppedError(RuntimeError):
    """Cells are left that cannot run now; what finished is stored and a rerun resumes."""


class ClusterShrankError(SweepStoppedError):
    """Cells are left that no worker can take any more (a node died)."""


class WorkersNotStartingError(SweepStoppedError):
    """Cells wait on workers that do not start: no node for them arrived in time, or they die starting."""


class ClusterUnreachableError(SweepStoppedError):
    """`--address` names no Ray cluster this driver can join; nothing ran."""
