"""Commands: filled in by their issue."""

from se_deploy.cli import app  # noqa: F401
