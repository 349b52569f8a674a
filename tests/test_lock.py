"""The lock files and pyproject.toml agree, and the suite runs on exactly what is locked.

`make run`, `make test` and the Dockerfile install from requirements/*.txt with
--require-hashes; `make lock` writes them. These tests fail when someone edits
pyproject.toml's dependencies without running `make lock`, or edits a lock by hand.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int


def read_lock(name: str) -> list[Pin]:
    pins: list[Pin] = []
    for line in (REQS / name).read_text().splitlines():
        if line.startswith("    --hash=sha256:"):
            last = pins.pop()
            pins.append(Pin(last.name, last.version, last.marker, last.hashes + 1))
            continue
        if not line or line.startswith(("#", " ")):
            continue
        match = PIN.match(line)
        assert match, f"{name}: not a pinned requirement: {line!r}"
        marker = Marker(match[3]) if match[3] else None
        pins.append(Pin(canonicalize_name(match[1]), Version(match[2]), marker, 0))
    return pins


def declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extra:
        lines += project["optional-dependencies"][extra]
    for line in (REQS / "build.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            lines.append(line)
    return [Requirement(line) for line in lines]


def makefile_compile_flags() -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(r"^UV_COMPILE = \$\(LOCK_VENV\)/bin/uv (pip compile .*?)\$\(if", text, re.M)
    assert match, "the Makefile's UV_COMPILE line moved: update this test"
    return match[1].replace("$(LOCK_INPUTS)", "pyproject.toml requirements/build.in").strip()


@pytest.mark.parametrize(("lock", "extra"), [("run.txt", None), ("dev.txt", "dev")])
def test_every_declared_dependency_is_locked_at_a_version_it_allows(lock, extra):
    pins = read_lock(lock)
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    for requirement in declared(extra):
        name = canonicalize_name(requirement.name)
        assert name in by_name, f"{requirement} is in pyproject.toml but not in {lock}: make lock"
        for pin in by_name[name]:
            assert requirement.specifier.contains(pin.version, prereleases=True), (
                f"{lock} pins {name}=={pin.version}, which pyproject.toml's {requirement}"
                " does not allow: make lock"
            )


@pytest.mark.parametrize("lock", ["run.txt", "dev.txt", "lock-tool.txt"])
def test_every_pin_has_hashes(lock):
    unhashed = [pin.name for pin in read_lock(lock) if pin.hashes == 0]
    assert unhashed == []


@pytest.mark.parametrize(("lock", "extra"), [("run.txt", ""), ("dev.txt", " --extra dev")])
def test_the_lock_was_written_by_make_lock(lock, extra):
    header = (REQS / lock).read_text().splitlines()[1].lstrip("# ").strip()
    flags = makefile_compile_flags().replace(" --quiet", "")
    assert header == f"uv {flags}{extra} -o requirements/{lock}"


def test_running_needs_a_subset_of_testing_at_the_same_versions():
    dev = {(p.name, str(p.marker)): p.version for p in read_lock("dev.txt")}
    for pin in read_lock("run.txt"):
        assert dev.get((pin.name, str(pin.marker))) == pin.version, pin


def test_this_suite_runs_on_exactly_the_locked_versions():
    """make test installed from the lock: what is installed here is what is pinned there."""
    for pin in read_lock("dev.txt"):
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        installed = Version(metadata.version(pin.name))
        assert installed == pin.version, f"{pin.name}: installed {installed}, locked {pin.version}"


def test_the_image_installs_the_lock_and_nothing_unpinned():
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line or "pip wheel" in line]
    assert installs, "the Dockerfile installs nothing?"
    for line in installs:
        locked = "--require-hashes -r" in line and "run.txt" in line
        own_wheel = "--no-deps" in line and ("/wheels" in line or "--no-build-isolation" in line)
        assert locked or own_wheel, f"an install the lock does not pin: {line.strip()}"
