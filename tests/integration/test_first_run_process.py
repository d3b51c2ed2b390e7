"""
First-run rough edges, as a new user meets them (issue 8 points 6 and 7): bad
start-up input ends the process with one line and a non-zero exit, never a
traceback; twistd finds the plugin without PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.live import BIN, REPO_ROOT
from tests.support.processes import python_module

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

STAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run(argv: list[str], *, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, capture_output=True, text=True, timeout=timeout, start_new_session=True, **kwargs
    )


def env_without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# -- point 7 -----------------------------------------------------------------------------


def test_router_port_in_use_is_one_line_and_status_1(busy_port: int) -> None:
    done = run(python_module("twisted_router", "--host", "127.0.0.1", "--port", str(busy_port)))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "could not listen" in line]
    assert len(errors) == 1 and f"127.0.0.1:{busy_port}" in errors[0] and "Address already in use" in errors[0]


def test_twistd_port_in_use_exits_1_without_a_traceback(busy_port: int, tmp_path: Path) -> None:
    argv = [str(BIN / "twistd"), "-n", "--pidfile=", "sglang-d-router", "--host", "127.0.0.1", "--port", str(busy_port)]
    done = run(argv, cwd=tmp_path, env=env_without_pythonpath())
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert "could not listen" in output and "Address already in use" in output


def test_launcher_starts_no_worker_when_the_routers_port_is_busy(busy_port: int, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(textwrap.dedent("""
        launcher:
          backend: simulated
          num_workers: 2
          worker_host: 127.0.0.1
          restart: false
        """))
    done = run(python_module(
        "twisted_router", "--host", "127.0.0.1", "--port", str(busy_port), "--launcher-config", str(fleet)
    ))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert "could not listen" in output
    assert "launcher: starting" not in output and "[worker 0]" not in output, output


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:30000", "it must start with http:// or https://"),
        ("http://127.0.0.1:30000/v1", "a path ('/v1') is not allowed"),
        ("http://169.254.169.254:80", "is blocked"),
    ],
)
def test_malformed_worker_url_is_one_line_and_status_2(url: str, why: str) -> None:
    done = run(python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--worker-urls", url))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # nothing started
    (line,) = done.stderr.splitlines()
    assert line.startswith("sglang-d-router: error: --worker-urls: ") and why in line


def test_simulator_port_in_use_is_one_line_and_status_1(busy_port: int) -> None:
    done = run(python_module("twisted_router.simulator", "--host", "127.0.0.1", "--port", str(busy_port)))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("sglang-d-sim-worker: error: Couldn't listen on 127.0.0.1:") and "in use" in line


# -- point 6 -----------------------------------------------------------------------------


def test_twistd_finds_the_plugin_in_this_install_without_pythonpath(tmp_path: Path) -> None:
    """The test venv is the README's command two, an editable install; run from elsewhere."""
    listing = run([str(BIN / "twistd"), "--help"], cwd=tmp_path, env=env_without_pythonpath())
    assert listing.returncode == 0, listing.stderr
    assert "sglang-d-router" in listing.stdout
    usage = run([str(BIN / "twistd"), "-n", "sglang-d-router", "--help"], cwd=tmp_path, env=env_without_pythonpath())
    assert usage.returncode == 0, usage.stdout + usage.stderr
    assert "--worker-urls" in usage.stdout and "--log-level" in usage.stdout


def test_a_regular_install_ships_the_plugin_where_twistd_looks(tmp_path: Path) -> None:
    """
    Build the wheel that C{pip install .} installs, install it into a directory
    of its own, and ask twistd for the plugin with the repository kept off
    sys.path, so only the installed copy can be found.
    """
    build_dir = REPO_ROOT / "build"  # setuptools builds in the source tree
    had_build_dir = build_dir.exists()
    try:
        built = run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO_ROOT)],
            timeout=300,
        )
    finally:
        if not had_build_dir:
            shutil.rmtree(build_dir, ignore_errors=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("twisted_router-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/sglang_d_router_plugin.py" in names
    assert "twisted_router/dashboard.html" in names  # package data: the fleet page
    # Twisted's own packages must not be shadowed by empty ones of ours.
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    target = tmp_path / "site"
    installed = run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = (
        "import sys\n"
        f"sys.path = [{str(target)!r}] + [p for p in sys.path if p not in ('', {str(REPO_ROOT)!r})]\n"
        "import twisted_router\n"
        f"assert twisted_router.__file__.startswith({str(target)!r}), twisted_router.__file__\n"
        "from twisted_router.dashboard import load_page\n"
        "assert b'sglang-d-router fleet' in load_page().body\n"
        "from twisted.scripts.twistd import run\n"
        "sys.argv = ['twistd', '-n', 'sglang-d-router', '--help']\n"
        "run()\n"
    )
    usage = run([sys.executable, "-c", script], cwd=tmp_path, env=env_without_pythonpath())
    assert usage.returncode == 0, usage.stdout + usage.stderr
    assert "--worker-urls" in usage.stdout


# -- point 11 ----------------------------------------------------------------------------


def test_relayed_worker_lines_carry_one_timestamp_and_no_factory_noise(processes: Processes, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("launcher:\n  backend: simulated\n  num_workers: 1\n  worker_host: 127.0.0.1\n")
    router = processes.start(
        python_module("twisted_router", "--host", "127.0.0.1", "--port", "0", "--launcher-config", str(fleet))
    )
    line = router.wait_for_line(r"\[worker 0\] .*listening on http://", timeout=60).string
    assert len(STAMP.findall(line)) == 1, line
    router.wait_for_line(r"managed worker .* registered", timeout=60)
    assert "Starting factory" not in router.output()
