"""
Tests for C{--state-dir} and the launcher's C{state_dir}: parsed the same by
the console script and twistd, checked before anything starts (one line,
exit status 2), and on by default for launcher runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twisted_router import cli, tap
from twisted_router.config import ConfigError, RouterConfig, config_from_args
from twisted_router.launcher import (
    LauncherConfigError,
    default_state_dir,
    launcher_state_dir,
    load_launcher_config,
    parse_launcher_config,
)
from twisted_router.state import StateDocument
from twisted_router.statefile import STATE_FILE_NAME, open_state_dir

SIMULATED = "launcher:\n  backend: simulated\n  simulated:\n    workers: [{task_type: T2I}]\n"


def test_state_dir_is_off_by_default_and_parsed() -> None:
    assert RouterConfig().state_dir is None
    assert config_from_args([]).state_dir is None
    assert config_from_args(["--state-dir", "/var/lib/r"]).state_dir == "/var/lib/r"
    with pytest.raises(ConfigError, match="--state-dir must name a directory"):
        config_from_args(["--state-dir", " "])


def test_open_state_reads_the_saved_document(tmp_path: Path) -> None:
    open_state_dir(str(tmp_path)).file.save(StateDocument(weight_version="7"))
    config, state = cli.open_state(config_from_args(["--state-dir", str(tmp_path)]), None)
    assert state is not None and state.document == StateDocument(weight_version="7")
    assert config.state_dir == str(tmp_path)
    assert cli.open_state(RouterConfig(), None) == (RouterConfig(), None)


def test_console_script_exits_2_with_one_line_on_a_corrupt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / STATE_FILE_NAME).write_text('{"kind": "sglang-d-router-state", "format": 1, "fleet": {')
    with pytest.raises(SystemExit) as caught:
        cli.main(["--port", "0", "--state-dir", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"sglang-d-router: error: state file {tmp_path / STATE_FILE_NAME}: not valid JSON")


def test_twistd_exits_2_with_one_line_on_a_foreign_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / STATE_FILE_NAME).write_text('{"some": "other program"}')
    with pytest.raises(SystemExit) as caught:
        tap.Options().parseOptions(["--state-dir", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not a sglang-d-router-state file" in err


def test_twistd_exits_2_when_the_directory_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as caught:
        tap.Options().parseOptions(["--state-dir", str(tmp_path / "file" / "state")])
    assert caught.value.code == 2
    assert "cannot be written" in capsys.readouterr().err


def test_twistd_keeps_the_state_for_the_service(tmp_path: Path) -> None:
    options = tap.Options()
    options.parseOptions(["--state-dir", str(tmp_path / "s")])
    assert options.state is not None and options.state.document is None
    assert (tmp_path / "s").is_dir()


# -- the launcher's state_dir -------------------------------------------------------------


def test_launcher_runs_keep_state_by_default(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(SIMULATED)
    launcher = load_launcher_config(str(path))
    environ = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    expected = default_state_dir(str(path), environ)
    assert launcher_state_dir(launcher, environ) == expected
    assert expected.startswith(str(tmp_path / "xdg" / "sglang-d-router" / "fleet-"))
    # Another file gets another directory; the same file the same one.
    other = tmp_path / "sub" / "fleet.yaml"
    assert default_state_dir(str(other), environ) != expected
    assert default_state_dir(str(path), environ) == expected


def test_default_state_dir_without_xdg_is_under_the_home() -> None:
    home = os.path.expanduser("~")
    for environ in ({}, {"XDG_STATE_HOME": "relative/ignored"}):
        assert default_state_dir("/etc/fleet.yaml", environ).startswith(
            os.path.join(home, ".local", "state", "sglang-d-router", "fleet-")
        )


def test_launcher_state_dir_key(tmp_path: Path) -> None:
    source = str(tmp_path / "fleet.yaml")
    relative = parse_launcher_config({"launcher": {"model": "m", "state_dir": "state"}}, source=source)
    assert launcher_state_dir(relative) == str(tmp_path / "state")
    absolute = parse_launcher_config({"launcher": {"model": "m", "state_dir": "/srv/s"}}, source=source)
    assert launcher_state_dir(absolute) == "/srv/s"
    off = parse_launcher_config({"launcher": {"model": "m", "state_dir": False}}, source=source)
    assert launcher_state_dir(off) is None
    for bad, message in ((3, "launcher.state_dir: expected a string"), ("", "must not be empty"), (" ", "must not be empty"), (True, "expected a string, got a boolean")):
        with pytest.raises(LauncherConfigError, match=message):
            parse_launcher_config({"launcher": {"model": "m", "state_dir": bad}}, source=source)


def test_the_command_line_overrides_the_launcher_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(SIMULATED + "  state_dir: from-file\n")
    config = config_from_args(["--launcher-config", str(path), "--port", "0"])
    plan = cli.plan_launch(config)
    resolved, state = cli.open_state(config, plan)
    assert resolved.state_dir == str(tmp_path / "from-file")
    assert state is not None and (tmp_path / "from-file").is_dir()
    given = config_from_args(["--launcher-config", str(path), "--port", "0", "--state-dir", str(tmp_path / "cli")])
    assert cli.open_state(given, plan)[0].state_dir == str(tmp_path / "cli")


def _started_router_says(config: RouterConfig) -> list[str]:
    """Build and start the router service in memory; the log lines it wrote about its state."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    from twisted_router.service import make_router_service

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = MemoryReactorClock()
        service, _, _ = make_router_service(config, reactor, state=cli.open_state(config, None)[1])
        service.startService()
        service.stopService()
        reactor.advance(200)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events if "state" in formatEvent(e)]


def test_the_start_says_where_the_state_lives_and_whether_it_was_restored(tmp_path: Path) -> None:
    directory = tmp_path / "f2-state"
    config = config_from_args(["--host", "127.0.0.1", "--port", "0", "--state-dir", str(directory)])
    path = str(directory / STATE_FILE_NAME)
    first = _started_router_says(config)
    assert f"durable state in {path} (no state file yet: started empty)" in first, first
    again = _started_router_says(config)  # the first run wrote the file on its way out
    assert f"durable state in {path} (restored from it)" in again, again
    assert any(line.startswith("state restored: weight version") for line in again), again
