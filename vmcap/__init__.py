"""vmcap: capture Linux kernel crash dumps without touching non-RAM bytes.

``vmcap.open_dump(path)`` opens any dump vmcap reads (vmcap.api); it is
imported on first use, so `vmcap` itself starts without numpy or zstandard.
"""

__version__ = "0.2.0"

_API = ("open_dump", "Dump")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vmcap' has no attribute {name!r}")
