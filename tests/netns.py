"""Throw-away network namespaces for tests: `mnt-<random>` names, always deleted afterwards.

Shared by every root test of the project:

    from tests.netns import netns, netns_set, leftovers

    with netns() as ns:                 # one namespace, e.g. "mnt-3f9a1c2b"
        ip("-n", ns, "link", "add", ...)
    with netns_set(3) as (a, b, c):     # several at once, all removed together
        ...

Deletion happens in `finally`, so a failing test leaves nothing behind; `leftovers()` lists
what is left with a prefix (a test can assert on its own unique prefix), `delete_prefix()`
removes namespaces by prefix (for tests whose subject creates the namespaces itself).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

TEST_PREFIX = "mnt-"


def unique_prefix(prefix: str = TEST_PREFIX) -> str:
    """A fresh prefix such as `mnt-1a2b3c-` for a test that names several namespaces itself."""
    if not prefix.startswith(TEST_PREFIX):
        raise ValueError(f"test namespaces must start with {TEST_PREFIX!r}, got {prefix!r}")
    return f"{prefix}{secrets.token_hex(3)}-"


def ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `ip` (tests only; meshnet itself goes through meshnet.executor)."""
    return subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, check=check, timeout=60)


def list_netns() -> list[str]:
    out = ip("-j", "netns", "list").stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def leftovers(prefix: str = TEST_PREFIX) -> list[str]:
    """Namespaces whose name starts with `prefix` (default: every test namespace)."""
    return sorted(n for n in list_netns() if n.startswith(prefix))


def delete_prefix(prefix: str) -> list[str]:
    """Delete every namespace starting with `prefix`; returns those that could not be deleted."""
    if not prefix.startswith(TEST_PREFIX) or len(prefix) <= len(TEST_PREFIX):
        raise ValueError(f"refusing to delete namespaces by the broad prefix {prefix!r}")
    for name in leftovers(prefix):
        ip("netns", "del", name, check=False)
    return leftovers(prefix)


@contextmanager
def netns_set(n: int, prefix: str = TEST_PREFIX) -> Iterator[list[str]]:
    """`n` fresh namespaces `<prefix><random>` with `lo` up; all deleted on exit, whatever happened."""
    if not prefix.startswith(TEST_PREFIX):
        raise ValueError(f"test namespaces must start with {TEST_PREFIX!r}, got {prefix!r}")
    names: list[str] = []
    try:
        for _ in range(n):
            name = f"{prefix}{secrets.token_hex(4)}"
            ip("netns", "add", name)
            names.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        yield list(names)
    finally:
        for name in names:
            ip("netns", "del", name, check=False)


@contextmanager
def netns(prefix: str = TEST_PREFIX) -> Iterator[str]:
    """One fresh namespace, deleted on exit."""
    with netns_set(1, prefix) as names:
        yield names[0]
