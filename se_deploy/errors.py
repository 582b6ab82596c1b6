"""The one exception type for failures a user must fix; the CLI turns it into a one-line message."""


class SeDeployError(Exception):
    """A user-facing failure: bad input, missing dependency, mismatch. The message is one line."""


class ModelServerLostError(SeDeployError):
    """A model server (Triton) that was serving stopped answering mid-run; a run ends like a lost stream."""
