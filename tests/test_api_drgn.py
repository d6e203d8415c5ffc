"""vmcap.open_dump (one Dump for every container) and the drgn bridge.

The oracle for the bridge is drgn itself on the plain vmcore (libdrgn's
own ELF core reader); for open_dump, pyelftools' view of the plain file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import vmcap
from vmcap.errors import BadSource, Unsupported

from conftest import spec

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


def vmcap_cli(*args):
    result = subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def plain_loads(path):
    with open(path, "rb") as f:
        return [(s["p_paddr"], s["p_memsz"], s["p_filesz"], s["p_offset"])
                for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


@pytest.fixture
def saved(make_vmcore, tmp_path):
    source, info = make_vmcore(spec())
    out = {"elf": source}
    for name, args in (("zelf", ["--frame-size", "64K"]),
                       ("kdump", ["--format", "kdump", "--compress", "lzo"]),
                       ("kdump-flat", ["--format", "kdump-flat", "--compress", "zlib"])):
        path = tmp_path / f"d.{name}"
        vmcap_cli("save", "-q", *args, source, path)
        out[name] = str(path)
    return out


def test_open_dump_reads_every_container_like_the_source(saved):
    source = saved["elf"]
    with open(source, "rb") as f:
        data = f.read()
    for container, path in saved.items():
        with vmcap.open_dump(path) as dump:
            assert dump.container == {"zelf": "zstd-seekable"}.get(container, container)
            assert dump.platform.arch == "x86_64" and dump.platform.machine == "EM_X86_64"
            assert dump.page_size == PAGE and dump.platform.elf_class == 64
            assert dump.vmcoreinfo.get("OSRELEASE")
            assert b"OSRELEASE=" in dump.vmcoreinfo_raw
            described = dump.describe()  # what `vmcap inspect --json` prints
            assert described["container"] == dump.container
            assert described["osrelease"] == dump.vmcoreinfo["OSRELEASE"]
            assert dump.size == dump.elf.size and dump.pread(0, 4) == b"\x7fELF"
            stored = dump.physical.stored_ranges()
            source_bytes = sum(filesz for _, _, filesz, _ in plain_loads(source))
            # A kdump file stores whole pages: a fractional page's non-RAM bytes too.
            assert sum(size for _, size in stored) == source_bytes if "kdump" not in container else \
                0 < sum(size for _, size in stored) - source_bytes < len(stored) * 2 * PAGE
            # Every stored byte of the source reads the same at its physical address.
            for paddr, memsz, filesz, offset in plain_loads(source):
                if filesz:
                    assert dump.physical.read(paddr, filesz) == data[offset:offset + filesz], \
                        (container, hex(paddr))
            with pytest.raises(BadSource):
                dump.physical.read(1 << 50, 16)


def test_open_dump_refuses_what_it_cannot_read(tmp_path, saved):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0" * 8192)
    with pytest.raises(BadSource, match="not a dump vmcap reads"):
        vmcap.open_dump(str(garbage))
    wrapped = tmp_path / "d.flat.gz"
    subprocess.run(f"gzip -c {saved['kdump-flat']} > {wrapped}", shell=True, check=True)
    with pytest.raises(Unsupported, match="no random access"):
        vmcap.open_dump(str(wrapped))


def test_vmcap_imports_open_dump_lazily():
    code = ("import sys, vmcap; assert 'vmcap.api' not in sys.modules; "
            "vmcap.open_dump; assert 'vmcap.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------ drgn on the real dump


@pytest.fixture(scope="module")
def real_saved(real_vmcore, tmp_path_factory):
    where = tmp_path_factory.mktemp("real-api")
    out = {}
    for name, args in (("zelf", []), ("lzo", ["--format", "kdump", "--compress", "lzo"])):
        path = where / f"real.{name}"
        vmcap_cli("save", "-q", *args, real_vmcore, path)
        out[name] = str(path)
    return out


@pytest.mark.slow
def test_drgn_bridge_reads_what_drgn_reads_from_the_plain_vmcore(real_vmcore, real_saved):
    drgn = pytest.importorskip("drgn")
    from vmcap.drgn_bridge import program_from_dump

    plain = drgn.Program()
    plain.set_core_dump(real_vmcore)
    with vmcap.open_dump(real_vmcore) as dump:
        info = dump.vmcoreinfo
    virtual = [int(info[f"SYMBOL({name})"], 16) for name in ("init_uts_ns", "swapper_pg_dir")]
    physical = [paddr + size // 3 // PAGE * PAGE for paddr, _, size, _ in plain_loads(real_vmcore)
                if size >= 3 * PAGE]
    assert len(physical) >= 2
    for name, path in real_saved.items():
        with vmcap.open_dump(path) as dump:
            program = program_from_dump(dump)
            for address in virtual:  # through drgn's own page table walk
                assert program.read(address, 4096) == plain.read(address, 4096), (name, address)
            for address in physical:
                assert program.read(address, PAGE, True) == plain.read(address, PAGE, True)
            uts = program.read(virtual[0], 400)
            assert uts.startswith(b"Linux\0")
        # A path: the Program keeps its Dump open itself.
        program = program_from_dump(path)
        assert program.read(virtual[0], 64) == plain.read(virtual[0], 64)
