"""A Kubernetes API server for tests (see `server.py`), and its pytest fixture (`fixtures.py`)."""

from .server import TOKEN, ApiError, ApiRequest, KubeApiServer, Target, parse_path

__all__ = ["TOKEN", "ApiError", "ApiRequest", "KubeApiServer", "Target", "parse_path"]
