"""C{--log-level} takes the earlier router's level names (issue 8 point 1), on both entry points."""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel
from twisted.python import usage

from twisted_router import tap
from twisted_router.config import LOG_LEVELS, ConfigError, RouterConfig, config_from_args

EARLIER_ROUTER_NAMES = ["critical", "error", "warning", "info", "debug", "trace"]


def test_the_earlier_routers_names_are_the_choices() -> None:
    assert list(LOG_LEVELS) == EARLIER_ROUTER_NAMES


@pytest.mark.parametrize(
    ("typed", "stored", "twisted_level"),
    [
        ("critical", "critical", LogLevel.critical),
        ("ERROR", "error", LogLevel.error),
        ("warning", "warning", LogLevel.warn),
        ("Warning", "warning", LogLevel.warn),
        ("warn", "warning", LogLevel.warn),
        ("WARN", "warning", LogLevel.warn),
        ("info", "info", LogLevel.info),
        ("Debug", "debug", LogLevel.debug),
        ("trace", "trace", LogLevel.debug),
        ("TRACE", "trace", LogLevel.debug),
    ],
)
def test_names_are_case_insensitive_and_map_to_a_twisted_level(
    typed: str, stored: str, twisted_level: LogLevel
) -> None:
    for config in (config_from_args(["--log-level", typed]), _twistd_config(["--log-level", typed])):
        assert config.log_level == stored
        assert LogLevel.levelWithName(config.effective_log_level) is twisted_level


def test_the_dataclass_normalises_like_the_command_line() -> None:
    assert RouterConfig(log_level="WARN") == config_from_args(["--log-level", "warning"])


def test_verbose_still_means_debug() -> None:
    assert config_from_args(["--log-level", "warning", "--verbose"]).effective_log_level == "debug"


def test_unknown_level_is_refused_by_both_entry_points(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--log-level", "loud"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    with pytest.raises(usage.UsageError, match="invalid choice: 'loud'"):
        tap.Options().parseOptions(["--log-level", "loud"])
    with pytest.raises(ConfigError, match="--log-level"):
        RouterConfig(log_level="loud")


def _twistd_config(argv: list[str]) -> RouterConfig:
    options = tap.Options()
    options.parseOptions(argv)
    return options.config
