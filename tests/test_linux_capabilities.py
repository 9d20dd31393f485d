"""The capability name table and the 64-bit set helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bulkhead_agent.linux import capabilities as caps


def test_table_is_complete_and_numbered_like_the_kernel_headers() -> None:
    assert len(caps.CAPABILITIES) == 41
    assert sorted(caps.CAPABILITIES.values()) == list(range(41))
    assert caps.CAPABILITIES["CAP_CHOWN"] == 0
    assert caps.CAPABILITIES["CAP_NET_BIND_SERVICE"] == 10
    assert caps.CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert caps.CAPABILITIES["CAP_AUDIT_WRITE"] == 29
    assert caps.CAPABILITIES["CAP_SETFCAP"] == 31
    assert caps.CAPABILITIES["CAP_AUDIT_READ"] == 37
    assert caps.CAPABILITIES["CAP_BPF"] == 39
    assert caps.CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert caps.CAP_NAMES[40] == "CAP_CHECKPOINT_RESTORE"


def test_masks_round_trip() -> None:
    names = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    mask = caps.mask_of(names)
    assert mask == (1 << 29) | (1 << 5) | (1 << 10)
    assert sorted(caps.names_of(mask)) == sorted(names)
    with pytest.raises(KeyError):
        caps.mask_of(["CAP_NOPE"])


def test_running_kernel_knows_no_more_than_the_table() -> None:
    assert caps.last_cap() <= caps.CAP_LAST_KNOWN


def test_capget_matches_proc_status() -> None:
    sets = caps.capget()
    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines)
    assert sets.effective == int(status["CapEff"], 16)
    assert sets.permitted == int(status["CapPrm"], 16)
    assert sets.inheritable == int(status["CapInh"], 16)
    if os.geteuid() == 0:
        assert sets.effective >> 21 & 1  # CAP_SYS_ADMIN
