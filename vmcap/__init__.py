"""vmcap: capture Linux kernel crash dumps without touching non-RAM bytes."""

__version__ = "0.2.0"
