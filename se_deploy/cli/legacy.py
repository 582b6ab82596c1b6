"""Spellings of earlier releases that option declarations cannot express, rewritten before parsing.

``--json FILE`` (export, check, quantize, build-trt) wrote the report to FILE; ``--json`` is now a flag
that prints JSON on stdout. The old form still works: it becomes the hidden ``--json-file FILE``.
"""

from __future__ import annotations

JSON_FILE_COMMANDS = frozenset({"export", "check", "quantize", "build-trt"})


def rewrite_legacy(argv: list[str]) -> list[str]:
    """``argv`` with old spellings replaced by their new form, each announced with a deprecation note."""
    from se_deploy.cli.output import deprecated

    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in JSON_FILE_COMMANDS:
        return argv
    rewritten, args = [], iter(argv)
    for arg in args:
        if arg.startswith("--json="):
            arg, value = arg.split("=", 1)
        elif arg == "--json":
            value = next(args, None)
            if value is not None and (value.startswith("-") or not value.lower().endswith(".json")):
                rewritten += [arg, value]  # the flag, then an argument of its own
                continue
        else:
            rewritten.append(arg)
            continue
        if value is None:
            rewritten.append(arg)
            continue
        deprecated(f"--json {value}", f"--json > {value}")
        rewritten += ["--json-file", value]
    return rewritten
