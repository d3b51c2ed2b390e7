"""
Tests for checking C{--listen}, C{--host}/C{--port} and C{--metrics-listen}
before anything starts: a bad endpoint is one line on stderr and status 2,
from the console script and from twistd, never a traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from twisted_router import cli, tap
from twisted_router.config import ConfigError, config_from_args

#: A certificate file that holds no private key, for C{privateKey=}.
CERT_ONLY = """-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIUQ0Zq3V1mX5Zb6k0m3gkq8S2mZ6swCgYIKoZIzj0EAwIw
-----END CERTIFICATE-----
"""


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    cert = tmp_path / "cert.pem"
    cert.write_text(CERT_ONLY)
    return [
        (
            ["--listen", f"ssl:0:privateKey={tmp_path / 'nokey.pem'}:certKey={cert}:interface=127.0.0.1"],
            "--listen 'ssl:0:privateKey=.*' cannot be used: No such file or directory: .*nokey.pem",
        ),
        (
            ["--listen", f"ssl:0:privateKey={cert}:certKey={cert}:interface=127.0.0.1"],
            r"--listen 'ssl:.*' cannot be used: the TLS key or certificate was rejected \(OpenSSL: .*\)",
        ),
        (["--listen", "bogus:1234"], "--listen 'bogus:1234' cannot be used: Unknown endpoint type: 'bogus'"),
        (["--metrics-listen", "tcp:notaport"], "--metrics-listen 'tcp:notaport' cannot be used: invalid literal"),
    ]


def test_good_endpoints_pass_and_build_nothing_that_listens(tmp_path: Path) -> None:
    reactor = Clock()  # no listenTCP: checking must not bind anything
    cli.check_listen_endpoints(config_from_args(["--listen", "tcp:0:interface=127.0.0.1"]), reactor)
    cli.check_listen_endpoints(config_from_args(["--metrics-listen", "unix:" + str(tmp_path / "m.sock")]), reactor)
    cli.check_listen_endpoints(config_from_args([]), reactor)


def test_each_bad_endpoint_is_a_one_line_config_error(tmp_path: Path) -> None:
    for argv, message in _bad_cases(tmp_path):
        with pytest.raises(ConfigError, match=message) as caught:
            cli.check_listen_endpoints(config_from_args(argv), Clock())
        assert "\n" not in str(caught.value)


def test_console_script_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in _bad_cases(tmp_path):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sglang-d-router: error: "), err
        assert re.search(message, err), err
        assert "Traceback" not in err


def test_twistd_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in _bad_cases(tmp_path):
        with pytest.raises(SystemExit) as caught:
            tap.Options().parseOptions(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("twistd sglang-d-router: error: "), err
        assert re.search(message, err), err


def test_the_console_script_process_says_one_line(tmp_path: Path) -> None:
    """The installed script, as a user runs it: no traceback, status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "twisted_router", "--listen", "bogus:1234"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "sglang-d-router: error: --listen 'bogus:1234' cannot be used: Unknown endpoint type: 'bogus'\n"
