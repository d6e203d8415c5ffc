"""Shared fixtures: vmcores built like fs/proc/vmcore.c, and the real dumps when present."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmcap.sample import RamRange, SampleSpec, build_vmcore

SHARED_VMCORES = Path(__file__).resolve().parents[1].parent / "shared" / "vmcores"
REAL_DUMP = SHARED_VMCORES / "qemu-6.1-panic.elf.zst"

# The situations firmware creates, each as a list of System RAM ranges
# (p_paddr, p_memsz), as /proc/iomem would give them.
PAGE = 4096
FRACTIONAL_RANGES = (
    RamRange(0x1000, 0x9fc00 - 0x1000),          # ends mid-page (e820 ...-0x9fbff)
    RamRange(0x100000, 0x200000),                 # whole pages
    RamRange(0x300400, 0x10000 - 0x400),          # starts mid-page (ACPI table before it)
    RamRange(0x400100, 0x200),                    # sub-page segment
    RamRange(0x500000, 0x2800),                   # two RAM ranges sharing page 0x502000:
    RamRange(0x502800, 0x1800 + 0x3000),          #   ...-0x5027ff and 0x502800-...
)


def spec(ranges=FRACTIONAL_RANGES, **kwargs) -> SampleSpec:
    kwargs.setdefault("content", "pattern")
    return SampleSpec(ranges=tuple(ranges), **kwargs)


@pytest.fixture
def make_vmcore(tmp_path):
    """make_vmcore(spec) -> (path, VmcoreInfo); each call writes a new file."""
    counter = iter(range(1_000_000))

    def make(sample_spec: SampleSpec | None = None, name: str | None = None):
        sample_spec = sample_spec or spec()
        path = tmp_path / (name or f"vmcore-{next(counter)}")
        info = build_vmcore(str(path), sample_spec)
        return str(path), info

    return make


@pytest.fixture(scope="session")
def real_vmcore(tmp_path_factory) -> str:
    """The real QEMU dump, decompressed once per session; skipped when absent."""
    if not REAL_DUMP.exists():
        pytest.skip(f"real dumps not present ({SHARED_VMCORES})")
    out = tmp_path_factory.mktemp("real") / "qemu-6.1-panic.elf"
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-d", "-q", "-f", str(REAL_DUMP), "-o", str(out)], check=True)
    else:
        import zstandard

        with open(REAL_DUMP, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
    return str(out)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def env_without_debug() -> dict:
    env = dict(os.environ)
    env.pop("VMCAP_DEBUG", None)
    return env
