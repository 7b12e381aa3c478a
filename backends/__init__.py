"""Backends of fastweights: the built-in plugins and the registry's public face.

This folder is installed as ``fastweights.backends``. Each built-in backend is a subpackage or
module here, registered through the ``fastweights.backends`` entry-point group exactly like a
third-party plugin.
"""

from fastweights._registry import Backend, BackendInfo, get_backend, list_backends
from fastweights._validate import Call

__all__ = ["Backend", "BackendInfo", "Call", "get_backend", "list_backends"]
