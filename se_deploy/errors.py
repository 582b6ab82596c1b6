"""The one exception type for failures a user must fix; the CLI turns it into a one-line message."""


class SeDeployError(Exception):
    """A user-facing failure: bad input, missing dependency, mismatch. The message is one line."""
