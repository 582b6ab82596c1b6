"""The ``se-deploy`` command line: thin Typer commands over the library.

Commands live in one module per concern and register on ``app``. Library code raises
``SeDeployError``; only ``main`` turns it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from se_deploy.cli.signals import EXIT_TERMINATED, Terminated, raise_on_sigterm
from se_deploy.errors import SeDeployError

app = typer.Typer(
    name="se-deploy",
    help="Deploy SE-YOLOv5 detectors: safe checkpoint loading, clean ONNX, TensorRT engines, fast video inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Deploy SE-YOLOv5 detectors: safe checkpoint loading, clean ONNX, TensorRT engines, fast video inference."""


EXIT_ERROR = 2  # bad input or missing dependency; 1 is kept for "ran, but the check failed"

# Each module registers its commands on app; --help lists them in pipeline order.
from se_deploy.cli import model_cmds  # noqa: E402,F401,I001  inspect
from se_deploy.cli import export_cmds  # noqa: E402,F401  export, check
from se_deploy.cli import trt_cmds  # noqa: E402,F401  quantize, build-trt
from se_deploy.cli import infer_cmds  # noqa: E402,F401  infer, bench, demo
from se_deploy.cli import eval_cmds  # noqa: E402,F401  val, report
from se_deploy.cli import serving_cmds  # noqa: E402,F401  triton, serve


def _one_line(message: str) -> str:
    """Messages from deep below (ONNX Runtime, torch, ModelOpt) can span lines; the error is one."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main() -> None:
    """Entry point of the console script and of ``python cli.py``.

    Library failures (SeDeployError) and usage errors (a missing argument, an option out of range)
    both become one ``error:`` line on stderr and exit code 2.
    """
    from se_deploy.cli.legacy import rewrite_legacy

    raise_on_sigterm()
    try:
        code = app(args=rewrite_legacy(sys.argv[1:]), prog_name="se-deploy", standalone_mode=False)
    except SeDeployError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except typer.TyperException as e:  # usage errors: missing argument, bad value, unknown option or command
        context = getattr(e, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except (KeyboardInterrupt, typer.Abort):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    sys.exit(code if isinstance(code, int) else 0)
