"""Shared pytest setup for the unit and native tests."""

from __future__ import annotations

import pytest

# The spawner refuses to fork from a process with other Python threads (fork is
# unsafe there, which is the point of the spawner). In-process gRPC servers and
# clients of other tests leave threads behind, so tests that launch a spawner in
# this process run first, while pytest is still single-threaded.
FORKS_FIRST = ("test_spawner_", "test_linux_", "test_oci_")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: 0 if item.path.name.startswith(FORKS_FIRST) else 1)
