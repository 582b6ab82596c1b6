"""The one exception type for failures a user must fix; the CLI turns it into a one-line message."""


class SeDeployError(Exception):
    """A user-facing failure: bad input, missing dependency, mismatch. The message is one line."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or its type name), at most ``limit`` characters:
    what a one-line error may quote from a library's multi-line text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text[:limit]


class ModelServerLostError(SeDeployError):
    """A model server (Triton) that was serving stopped answering mid-run; a run ends like a lost stream."""
