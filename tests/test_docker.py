"""The image's recipe refers to things that exist: the package it installs, the console script it runs,
the engines/ volume the library writes to. Docker itself is not needed (nor available in CI)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", "", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def arg_defaults() -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in args_of("ARG"))


def expand(value: str) -> str:
    """Substitute ${NAME} and $NAME with the ARG defaults, as a build without --build-arg would."""
    defaults = arg_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], value)


def exec_form(keyword: str) -> list[str]:
    (value,) = args_of(keyword)[-1:]
    return json.loads(value)


def pip_install_commands() -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN instructions."""
    return [shlex.split(m) for run in args_of("RUN") for m in re.findall(r"pip install ([^&;|]*)", run)]


def test_default_base_image_is_an_ngc_tensorrt_python_image():
    assert args_of("FROM") == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", arg_defaults()["BASE_IMAGE"])


def test_copied_sources_are_the_repos_package_and_pyproject():
    sources = [src for copy in args_of("COPY") for src in copy.split()[:-1]]
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert "pyproject.toml" in sources
    assert set(packages) <= set(sources), "every package pyproject ships must be copied"
    readme = PYPROJECT["project"].get("readme")
    if readme:
        assert readme in sources, "setuptools reads the readme while building the wheel"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repo"


def test_pip_installs_the_copied_project_and_no_tensorrt():
    """`pip install .` runs where pyproject.toml was copied; TensorRT stays the base image's own."""
    workdir, copied_to, installed_in = "/", None, None
    for keyword, value in instructions():
        if keyword == "WORKDIR":
            workdir = value
        elif keyword == "COPY" and "pyproject.toml" in value.split()[:-1]:
            copied_to = workdir
        elif keyword == "RUN" and re.search(r"pip install [^&;|]*[\"' ]\.(\[|\$|[\"' ]|$)", value):
            installed_in = workdir
    assert copied_to is not None and installed_in == copied_to, "the image must `pip install .` the checkout"
    extras = set(re.findall(r'extras="\[(\w+)\]"', " ".join(args_of("RUN"))))
    optional = PYPROJECT["project"]["optional-dependencies"]
    for extra in extras:
        assert extra in optional, f"extra [{extra}] is not declared in pyproject"
        assert not any(req.startswith("tensorrt") for req in optional[extra])
    everything = " ".join(a for cmd in pip_install_commands() for a in cmd).lower()
    assert "tensorrt" not in everything and "[trt]" not in everything


def test_entrypoint_is_the_declared_console_script():
    scripts = PYPROJECT["project"]["scripts"]
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint[0] in scripts
    module, _, func = scripts[entrypoint[0]].partition(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_entrypoint_starts_without_torch_or_tensorrt_importable():
    """The image has no torch, and TensorRT loads only on the device: `se-deploy --help` is its build check."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('torch', 'tensorrt', 'modelopt', 'onnxsim', 'onnxslim'):\n"
        "            raise ImportError('not in the image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['se-deploy', *sys.argv[1:]]\n"
        "from se_deploy.cli import main\n"
        "main()\n"
    )
    for args in (["--help"], ["infer", "--help"]):
        result = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True, cwd=REPO,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Usage: se-deploy" in result.stdout


def test_runs_from_workspace_with_engines_as_a_volume_and_not_as_root():
    from se_deploy.artifacts import ENGINES_DIR

    workdir = PurePosixPath(args_of("WORKDIR")[-1])
    assert workdir == PurePosixPath("/workspace")
    volumes = [PurePosixPath(v) for v in exec_form("VOLUME")]
    assert workdir / ENGINES_DIR.as_posix() in volumes, "the library's default engines/ must be the volume"
    user = expand(args_of("USER")[-1]).partition(":")[0]
    assert user not in ("", "0", "root")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            glob = line.lstrip("!").strip("/")
            regex = "".join(".*" if t == "**" else "[^/]*" if t == "*" else "[^/]" if t == "?"
                            else t if t.startswith("[") else re.escape(t)
                            for t in re.split(r"(\*\*|\*|\?|\[[^]]*\])", glob))
            patterns.append((re.compile(regex + "$"), negate))
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, negate in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_installs_and_drops_the_rest():
    sources = [src for copy in args_of("COPY") for src in copy.split()[:-1]]
    shipped = [p.relative_to(REPO).as_posix() for src in sources
               for p in ([REPO / src] if (REPO / src).is_file() else (REPO / src).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts]
    assert "se_deploy/assets/se-yolov5n-shapes.pt" in shipped  # package data comes along
    assert [p for p in shipped if dockerignored(p)] == []
    for local_only in (".venv/bin/python", "engines/model.engine", "runs/infer/out.mp4", "weights.pt", ".git/config",
                       "se_deploy/__pycache__/cli.cpython-311.pyc", "models/stale.pyc", "tests/conftest.py"):
        assert dockerignored(local_only), local_only


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_stream_job_runs_an_se_deploy_command_on_the_engines_volume(compose):
    import typer

    from se_deploy.cli import app

    commands = typer.main.get_command(app).commands
    assert set(compose["services"]) == {"stream", "stream-jetson", "stream-triton", "triton"}
    for name, service in compose["services"].items():
        if name == "triton":
            continue
        assert service["command"][0] in commands
        assert "./engines:/workspace/engines" in service["volumes"]
        assert service["restart"] == "unless-stopped" and service["pull_policy"] == "never"
    gpu = compose["services"]["stream"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert compose["services"]["stream-jetson"]["runtime"] == "nvidia"


def test_compose_triton_serves_the_repository_triton_writes_on_the_gpu(compose):
    """The triton service: NVIDIA's server of the release whose TensorRT built the engines, the repository
    `se-deploy triton` writes mounted where the server reads it, a health check on readiness; camera clients
    reach it by the service's name on the gRPC port and start once it is healthy."""
    from se_deploy.runners.triton_runner import parse_model_url
    from se_deploy.serving.model_config import PARAMETER_PREFIX, config_pb2
    from se_deploy.serving.model_repository import DEFAULT_REPOSITORY, TRITON_IMAGE, python_packages

    triton = compose["services"]["triton"]
    assert triton["image"] == TRITON_IMAGE
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", triton["image"]).group(1)
    assert arg_defaults()["BASE_IMAGE"] == f"nvcr.io/nvidia/tensorrt:{release}-py3"
    mounts = dict(v.split(":")[:2] for v in triton["volumes"])
    models = mounts[f"./{DEFAULT_REPOSITORY.as_posix()}"]
    shell = triton["command"][-1]
    assert f"exec tritonserver --model-repository={models}" in shell
    e2e = {role: config_pb2().ModelConfig(name=role, backend="python") for role in ("preprocess", "postprocess")}
    for role, config in e2e.items():
        config.parameters[PARAMETER_PREFIX + "role"].string_value = role
    for package in python_packages(e2e):  # what an --e2e repository's python models import
        assert shlex.quote(package) in shell
    assert sorted(triton["ports"]) == ["8000:8000", "8001:8001", "8002:8002"] and triton["shm_size"]
    assert "localhost:8000/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    client = compose["services"]["stream-triton"]
    model = client["command"][client["command"].index("--model") + 1]
    url = parse_model_url(model.replace("${SE_DEPLOY_TRITON_MODEL:-model}", "m"))
    assert (url.scheme, url.host, url.port) == ("grpc", "triton", 8001)
    assert client["depends_on"]["triton"]["condition"] == "service_healthy"
    assert client["profiles"] == triton["profiles"] == ["triton"]

