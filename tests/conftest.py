"""Shared fixtures. Root tests run (never skip) under CI; elsewhere they skip when not root."""

from __future__ import annotations

import os

import pytest

from tests.kubeapi.fixtures import kube_api  # noqa: F401 - a fixture, used by name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI must run the suite as root: the root tests may not be skipped")
    skip = pytest.mark.skip(reason="needs root (real network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
