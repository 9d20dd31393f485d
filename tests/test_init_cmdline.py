"""Unit tests of bulkhead_init.cmdline: the bulkhead.* kernel options (internals.md table)."""

from __future__ import annotations

import pytest

from bulkhead_init import cmdline
from bulkhead_init.cmdline import Config, parse

DEFAULTS = Config(
    log="info",
    vsock_port=1024,
    serial_port="bulkhead.agent",
    tcp_port=0,
    debug_console=False,
    hostname="bulkhead",
    agent_restart_max_ms=5000,
)


def test_defaults_match_the_documented_table() -> None:
    assert Config() == DEFAULTS
    assert parse("") == (DEFAULTS, [])


def test_other_words_are_ignored() -> None:
    text = "console=ttyS0 root=/dev/vda quiet bulkhead panic=1 notbulkhead.log=debug"
    assert parse(text) == (DEFAULTS, [])


@pytest.mark.parametrize(
    ("word", "field", "value"),
    [
        ("bulkhead.log=debug", "log", "debug"),
        ("bulkhead.log=WARNING", "log", "warning"),
        ("bulkhead.vsock_port=0", "vsock_port", 0),
        ("bulkhead.vsock_port=4294967295", "vsock_port", 4294967295),
        ("bulkhead.serial_port=my.port-1_x", "serial_port", "my.port-1_x"),
        ("bulkhead.serial_port=off", "serial_port", ""),
        ("bulkhead.tcp_port=65535", "tcp_port", 65535),
        ("bulkhead.debug_console=on", "debug_console", True),
        ("bulkhead.debug_console=off", "debug_console", False),
        ("bulkhead.debug_console=1", "debug_console", True),
        ("bulkhead.hostname=box-1", "hostname", "box-1"),
        ("bulkhead.hostname=" + "a" * 63, "hostname", "a" * 63),
        ("bulkhead.agent_restart_max_ms=100", "agent_restart_max_ms", 100),
        ("bulkhead.agent_restart_max_ms=600000", "agent_restart_max_ms", 600000),
    ],
)
def test_each_option(word: str, field: str, value: object) -> None:
    config, warnings = parse(f"console=hvc0 {word} quiet")
    assert warnings == []
    assert getattr(config, field) == value
    # Nothing else moved.
    for other in cmdline._FIELDS:
        if other != field:
            assert getattr(config, other) == getattr(DEFAULTS, other)


@pytest.mark.parametrize(
    "word",
    [
        "bulkhead.log=verbose",
        "bulkhead.vsock_port=-1",
        "bulkhead.vsock_port=4294967296",
        "bulkhead.vsock_port=0x10",
        "bulkhead.vsock_port=١٢",  # Unicode digits are not decimal ASCII
        "bulkhead.tcp_port=65536",
        "bulkhead.serial_port=a/b",
        "bulkhead.serial_port=" + "p" * 65,
        "bulkhead.debug_console=maybe",
        "bulkhead.hostname=-box",
        "bulkhead.hostname=box-",
        "bulkhead.hostname=a.b",
        "bulkhead.hostname=" + "a" * 64,
        "bulkhead.hostname=bøx",
        "bulkhead.hostname=",
        "bulkhead.agent_restart_max_ms=99",
        "bulkhead.agent_restart_max_ms=600001",
        "bulkhead.agent_restart_max_ms=",
    ],
)
def test_malformed_value_keeps_the_default(word: str) -> None:
    config, warnings = parse(word)
    assert config == DEFAULTS
    assert len(warnings) == 1
    assert warnings[0].startswith(f"bad kernel option {word!r}: ")
    assert warnings[0].endswith("keeping the default")


def test_unknown_option_is_reported_with_the_known_ones() -> None:
    config, warnings = parse("bulkhead.colour=blue bulkhead.log=debug")
    assert config == Config(log="debug")
    assert len(warnings) == 1
    assert warnings[0].startswith("bad kernel option 'bulkhead.colour=blue': unknown option")
    assert "bulkhead.agent_restart_max_ms" in warnings[0]


def test_missing_equals_is_reported() -> None:
    config, warnings = parse("bulkhead.debug_console bulkhead.hostname=x")
    assert config == Config(hostname="x")
    assert warnings == ["bad kernel option 'bulkhead.debug_console': missing '=value'"]


def test_last_occurrence_wins_and_every_bad_word_warns() -> None:
    config, warnings = parse("bulkhead.log=debug bulkhead.log=error bulkhead.x bulkhead.y=1")
    assert config.log == "error"
    assert len(warnings) == 2


def test_config_is_an_immutable_value() -> None:
    a, b = Config(hostname="h"), Config(hostname="h")
    assert a == b and hash(a) == hash(b) and a != Config()
    assert Config("debug", 5) == Config(log="debug", vsock_port=5)
    assert repr(Config()).startswith("Config(log='info', vsock_port=1024, ")
    with pytest.raises(AttributeError):
        a.log = "debug"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.hostname
    with pytest.raises(TypeError):
        Config(nonsense=1)  # type: ignore[call-arg]


def test_read_falls_back_to_defaults_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr("builtins.open", no_proc)
    config, warnings = cmdline.read()
    assert config == DEFAULTS
    assert warnings and warnings[0].startswith("cannot read /proc/cmdline")
