"""QEMU's dump-guest-memory outputs, read by vmcap (slow: boots a guest).

The lab script (../shared/lab/make-dump.sh) boots Debian's kernel in a
128 MiB guest under TCG, panics it and has QEMU write its ELF and kdump-zlib
dumps; QEMU 7.2's kdump files are flattened and, under KASLR, carry a wrong
phys_base in their sub header (QEMU parses the kernel's decimal
NUMBER(phys_base) as hex). makedumpfile cannot read them; vmcap must, and
its dmesg must equal makedumpfile's on the ELF dump of the same guest.

VMCAP_QEMU_DUMPS=DIR uses dumps made before (a make-dump.sh output folder:
panic.elf, panic.phdr64.elf, panic.kdump-zlib). Skipped without QEMU or the
unpacked kernel tests/capture uses.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmcap.describe import describe
from vmcap.formats.kdump import KdumpReader
from vmcap.kernel.dmesg import format_makedumpfile
from vmcap.kernel.vmcoreinfo import number, parse_vmcoreinfo
from vmcap.save import SaveOptions, save
from vmcap.source.dump import kernel_log, open_dump
from vmcap.verify import verify

from conftest import have

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT.parent / "shared" / "lab"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qemu_dumps(tmp_path_factory) -> Path:
    given = os.environ.get("VMCAP_QEMU_DUMPS")
    if given:
        return Path(given)
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "capture"))
    import harness

    kernel = harness.find_kernel()
    if not have("qemu-system-x86_64") or kernel is None or not (LAB / "make-dump.sh").exists():
        pytest.skip("needs qemu-system-x86_64, the lab scripts and an unpacked kernel "
                    f"({harness.CACHE / 'kernel'})")
    out = tmp_path_factory.mktemp("qemu-lab")
    (out / "kernel").symlink_to(kernel.root)
    result = subprocess.run([str(LAB / "make-dump.sh"), "128", "panic"], capture_output=True,
                            text=True, env=dict(os.environ, LAB_OUT=str(out)), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out / "simple"


@pytest.fixture(scope="module")
def makedumpfile_dmesg(qemu_dumps, tmp_path_factory) -> str:
    if not have("makedumpfile"):
        pytest.skip("makedumpfile not installed")
    out = tmp_path_factory.mktemp("qemu-dmesg") / "dmesg.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(qemu_dumps / "panic.phdr64.elf"),
                    str(out)], check=True, capture_output=True)
    return out.read_text("utf-8", "surrogateescape")


QEMU_FILES = ["panic.elf", "panic.kdump-zlib", "panic.kdump-zlib.rearranged"]


@pytest.mark.parametrize("name", QEMU_FILES)
def test_qemu_dumps_are_read_by_every_command(qemu_dumps, makedumpfile_dmesg, name):
    path = str(qemu_dumps / name)
    if not Path(path).exists():
        pytest.skip(f"{name} was not made")
    report = describe(path)
    # QEMU leaves the kdump header's utsname empty: the release is VMCOREINFO's.
    assert report["osrelease"] and report["osrelease"] in makedumpfile_dmesg
    assert verify(path)["status"] == "ok"
    with open_dump(path) as dump:
        assert format_makedumpfile(kernel_log(dump)) == makedumpfile_dmesg
    assert sum(row["pages"] for row in describe(path, mem_usage=True)["mem_usage"]) > 0


def test_qemu_kdump_with_a_wrong_header_phys_base_reads_through_vmcoreinfo(qemu_dumps):
    with KdumpReader(str(qemu_dumps / "panic.kdump-zlib")) as reader:
        header_base = reader.header.phys_base
        info = parse_vmcoreinfo(reader.vmcoreinfo)
    true_base = number(info, "phys_base") % (1 << 64)
    if header_base == true_base:
        pytest.skip("the guest ran without KASLR: QEMU's phys_base is right")
    with open_dump(str(qemu_dumps / "panic.kdump-zlib")) as dump:
        assert kernel_log(dump)


@pytest.mark.parametrize("output_format", ["zelf", "kdump"])
def test_qemu_flattened_kdump_is_a_save_source_plain_and_gzip_wrapped(
        qemu_dumps, tmp_path, output_format):
    source = qemu_dumps / "panic.kdump-zlib"
    out = tmp_path / f"out.{output_format}"
    save(str(source), str(out), SaveOptions(output_format=output_format, dump_level=31))
    result = verify(str(out), str(source))
    assert result["status"] == "ok" and result["dump_level"] == 31
    wrapped = tmp_path / "dump.gz"
    with open(source, "rb") as raw, gzip.open(wrapped, "wb", compresslevel=1) as packed:
        shutil.copyfileobj(raw, packed)
    again = tmp_path / f"again.{output_format}"
    save(str(wrapped), str(again), SaveOptions(output_format=output_format, dump_level=1))
    assert verify(str(again), str(source))["status"] == "ok"
