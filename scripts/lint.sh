#!/usr/bin/env bash
# Static checks (no Docker, no Python 3.10 needed):
#  - hadolint on the Dockerfile; any warning or error fails.
#  - Python 3.10 compatibility of everything that runs in the Jetson images (JetPack 6 carries 3.10):
#    any syntax, module or API newer than 3.10 fails, in annotations too (Typer evaluates them).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

"$bin/hadolint" --failure-threshold warning Dockerfile
echo "lint: Dockerfile clean (hadolint)"

py310=(se_deploy models cli.py scripts benchmarks)
# Grammar: parse each file as Python 3.10 would; vermin only warns about syntax it cannot parse.
"$bin/python" - "${py310[@]}" <<'PY'
import ast
import sys
from pathlib import Path

def star_unpacking(tree):
    """Line numbers of PEP 646 unpacking (`*args: *Ts`, `X[*Ts]`), which feature_version misses."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments) and node.vararg and isinstance(node.vararg.annotation, ast.Starred):
            yield node.vararg.lineno
        if isinstance(node, ast.Subscript):
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            yield from (item.lineno for item in items if isinstance(item, ast.Starred))


bad = 0
for arg in map(Path, sys.argv[1:]):
    for path in sorted(arg.rglob("*.py")) if arg.is_dir() else [arg]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
        except SyntaxError as e:
            print(f"{path}:{e.lineno}: {e.msg} (not Python 3.10 syntax)", file=sys.stderr)
            bad += 1
            continue
        for line in star_unpacking(tree):
            print(f"{path}:{line}: `*` unpacking in a subscript or *args annotation needs Python 3.11", file=sys.stderr)
            bad += 1
sys.exit(1 if bad else 0)
PY
# Modules, functions, arguments and constants added after 3.10.
"$bin/vermin" --quiet --violations --no-tips --eval-annotations --target=3.10- "${py310[@]}"
echo "lint: Python 3.10 compatible (grammar and APIs)"
