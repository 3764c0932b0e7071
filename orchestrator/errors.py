"""Errors the driver raises for outcomes that are expected on a real cluster, kept free of Ray imports so
the CLI can turn them into a message and an exit code without importing the driver."""


class ClusterShrankError(RuntimeError):
    """Cells are left that no worker can take any more; what finished is stored and a rerun resumes."""
