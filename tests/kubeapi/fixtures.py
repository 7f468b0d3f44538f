"""pytest fixture for the Kubernetes API test server; the project's conftest imports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import KubeApiServer


@pytest.fixture
def kube_api() -> Iterator[KubeApiServer]:
    """A fresh, empty API server per test; fails the test if the server itself crashed."""
    with KubeApiServer() as server:
        yield server
    assert not server.errors, "the kube API test server crashed:\n" + "\n".join(server.errors)
