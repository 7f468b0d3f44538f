"""Topology stores: `open_store(url)` picks one from a URL (the daemon's `--store`, `MESHNET_STORE`).

    sqlite:///var/lib/meshnet/store.db   an absolute path (three slashes)
    sqlite:store.db                      a path relative to the working directory
    kube                                 the Kubernetes API: in-cluster config when the pod's
                                         service-account token exists, else the default kubeconfig
    kube:?kubeconfig=PATH&qps=50&burst=100

`kube` is imported only when asked for: the `kubernetes` package costs ~0.5 s to import.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from meshnet.store.base import (
    StatusMutation,
    Store,
    StoreConflict,
    StoreError,
    StoreInvalid,
    StoreUnavailable,
    WatchEvent,
)

__all__ = [
    "StatusMutation",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreInvalid",
    "StoreUnavailable",
    "WatchEvent",
    "open_store",
]

_KUBE_OPTIONS = {"kubeconfig", "qps", "burst"}


def open_store(url: str) -> Store:
    """The store `url` names; ValueError (naming the problem) for a URL that names none."""
    if url == "kube":
        url = "kube:"
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or parts.query or parts.fragment or not parts.path:
            raise ValueError(f"store URL {url!r}: write sqlite:///absolute/path.db or sqlite:relative/path.db")
        from meshnet.store.sqlite import SqliteStore

        return SqliteStore(parts.path)
    if parts.scheme == "kube":
        if parts.netloc or parts.path or parts.fragment:
            raise ValueError(f"store URL {url!r}: write kube or kube:?kubeconfig=PATH&qps=N&burst=N")
        options = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(options) - _KUBE_OPTIONS)
        if unknown:
            raise ValueError(f"store URL {url!r}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(_KUBE_OPTIONS))})")
        try:
            qps = float(options.get("qps", "50"))
            burst = int(options.get("burst", "100"))
        except ValueError as e:
            raise ValueError(f"store URL {url!r}: qps must be a number and burst an integer") from e
        if qps <= 0 or burst < 1:
            raise ValueError(f"store URL {url!r}: qps must be > 0 and burst >= 1")
        from meshnet.store.kube import KubeStore

        return KubeStore(kubeconfig=options.get("kubeconfig") or None, qps=qps, burst=burst)
    raise ValueError(f"store URL {url!r}: unknown store (known: sqlite:PATH, kube)")
