"""One opened-dump object (vmcap.source.dump) and one Platform (vmcap.kernel.arch).

Each detector on a file of its format; a Platform for every machine of the
table, in every class and byte order; one Dump per container reading the
same bytes as the plain file it stands for; ``check()`` catching a flipped
byte of each container that can vouch for itself.
"""

from __future__ import annotations

import gzip
import struct

import pytest

from vmcap.errors import BadSource, CorruptOutput, Unsupported
from vmcap.fileio.mmapio import FileSource
from vmcap.formats.kdump import KdumpReader
from vmcap.kernel.arch import (
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_LOONGARCH,
    EM_PPC,
    EM_PPC64,
    EM_RISCV,
    EM_S390,
    EM_X86_64,
    MACHINES,
    make_platform,
    make_translator,
    platform_named,
)
from vmcap.kernel.memory import struct_prefix
from vmcap.kernel.riscv64 import Riscv64Translator
from vmcap.kernel.translate import X86_64Translator
from vmcap.save import SaveOptions, save
from vmcap.source.dump import (
    ElfDump,
    KdumpDump,
    ZelfDump,
    detect,
    detect_container,
    open_dump,
)
from vmcap.source.layout import read_layout

from conftest import spec

# --- Platform --------------------------------------------------------------------------------

# (e_machine, class, byte order) -> (arch, readelf name, default page size, kdump utsname or None)
EXPECTED = {
    (EM_X86_64, 64, "little"): ("x86_64", "EM_X86_64", 4096, "x86_64"),
    (EM_386, 32, "little"): ("i386", "EM_386", 4096, "i686"),
    (EM_AARCH64, 64, "little"): ("aarch64", "EM_AARCH64", 4096, "aarch64"),
    (EM_AARCH64, 64, "big"): ("aarch64", "EM_AARCH64", 4096, "aarch64"),
    (EM_ARM, 32, "little"): ("arm", "EM_ARM", 4096, "arm"),
    (EM_PPC64, 64, "little"): ("ppc64le", "EM_PPC64", 65536, "ppc64le"),
    (EM_PPC64, 64, "big"): ("ppc64", "EM_PPC64", 65536, "ppc64"),
    (EM_PPC, 32, "big"): ("ppc", "EM_PPC", 4096, "ppc"),
    (EM_S390, 64, "big"): ("s390x", "EM_S390", 4096, "s390x"),
    (EM_S390, 32, "big"): ("s390", "EM_S390", 4096, "s390"),
    (EM_RISCV, 64, "little"): ("riscv64", "EM_RISCV", 4096, "riscv64"),
    (EM_RISCV, 32, "little"): ("riscv64", "EM_RISCV", 4096, None),  # as vmcap 0.1 named it
    (EM_LOONGARCH, 64, "little"): ("loongarch64", "EM_LOONGARCH", 16384, "loongarch64"),
    (8, 32, "big"): ("mips", "EM_MIPS", 4096, None),
    (43, 64, "big"): ("sparc64", "EM_SPARCV9", 8192, None),
    (50, 64, "little"): ("ia64", "EM_IA_64", 16384, None),
    (42, 32, "little"): ("sh", "EM_SH", 4096, None),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_platform_of_each_machine(key):
    e_machine, elf_class, byte_order = key
    arch, name, page, utsname = EXPECTED[key]
    platform = make_platform(elf_class=elf_class, byte_order=byte_order, e_machine=e_machine)
    assert (platform.arch, platform.machine, platform.default_page_size) == (arch, name, page)
    assert (platform.e_machine, platform.elf_class, platform.byte_order) == key
    assert platform.struct_prefix == ("<" if byte_order == "little" else ">")
    if utsname is None:
        with pytest.raises(Unsupported, match=f"e_machine {e_machine} "):
            platform.utsname
        return
    assert platform.utsname == utsname
    # A kdump header's utsname gives the same Platform back.
    again = make_platform(elf_class=elf_class, byte_order=byte_order, utsname=utsname)
    assert again == platform


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
@pytest.mark.parametrize("elf_class, byte_order", [(32, "little"), (32, "big"), (64, "little"), (64, "big")])
def test_every_machine_of_the_table_in_every_class_and_byte_order(machine, elf_class, byte_order):
    platform = make_platform(elf_class=elf_class, byte_order=byte_order, e_machine=machine.e_machine)
    assert platform.machine == machine.name and platform.e_machine == machine.e_machine
    assert platform.byte_order == byte_order and platform.elf_class == elf_class
    assert platform.default_page_size == machine.page_size
    assert platform.arch and platform.arch == platform.arch.lower()
    assert platform.struct_prefix == struct_prefix(byte_order)
    assert struct.pack(platform.struct_prefix + "I", 1)[0 if byte_order == "little" else 3] == 1
    assert platform.translator_kind == machine.translator


def test_an_unlisted_machine_keeps_its_number_and_an_unknown_utsname_is_unsupported():
    platform = make_platform(elf_class=64, byte_order="little", e_machine=4242)
    assert (platform.arch, platform.machine, platform.default_page_size) == ("4242", "4242", 4096)
    with pytest.raises(Unsupported, match="'xb6_64' has no ELF machine"):
        make_platform(elf_class=64, byte_order="little", utsname="xb6_64")


@pytest.mark.parametrize("name, kind, byte_order", [
    ("EM_X86_64", "x86_64", "little"), ("amd64", "x86_64", "little"), ("x86-64", "x86_64", "little"),
    ("EM_AARCH64", "aarch64", "little"), ("arm64", "aarch64", "little"), ("aarch64_be", "aarch64", "big"),
    ("EM_PPC64", "ppc64", "little"), ("ppc64", "ppc64", "big"), ("ppc64le", "ppc64", "little"),
    ("EM_S390", "s390x", "little"), ("s390x", "s390x", "big"), ("s390", "s390x", "big"),
    ("EM_RISCV", "riscv64", "little"), ("riscv64", "riscv64", "little"),
    ("EM_MIPS", None, "little"), ("i686", None, "little"),
])
def test_machine_names_of_both_spellings_name_one_platform(name, kind, byte_order):
    platform = platform_named(name)
    assert platform.translator_kind == kind
    assert platform.byte_order == byte_order  # a utsname says it where it can


def test_platform_translator_picks_the_layer_of_its_machine():
    x86_info = {"SYMBOL(init_top_pgt)": "ffffffff82a0c000", "NUMBER(phys_base)": "0"}
    x86 = make_platform(elf_class=64, byte_order="little", e_machine=EM_X86_64)
    assert isinstance(x86.translator(lambda p, s: b"", x86_info), X86_64Translator)
    riscv_info = {"NUMBER(VA_BITS)": "39", "SYMBOL(swapper_pg_dir)": "ffffffff81000000",
                  "NUMBER(va_kernel_pa_offset)": "0xffffffff00000000"}
    riscv = make_platform(elf_class=64, byte_order="little", e_machine=EM_RISCV)
    assert isinstance(riscv.translator(lambda p, s: b"", riscv_info), Riscv64Translator)
    # A big-endian arm64 ELF core's page tables are read big endian (its ELF header says so;
    # before the Platform only a kdump header's "aarch64_be" did).
    from test_aarch64 import CONFIGS

    arm64_be = make_platform(elf_class=64, byte_order="big", e_machine=EM_AARCH64)
    assert arm64_be.translator(lambda p, s: b"", CONFIGS[0].vmcoreinfo()).byte_order == "big"
    arm = make_platform(elf_class=32, byte_order="little", e_machine=EM_ARM)
    with pytest.raises(Unsupported, match="not EM_ARM"):
        arm.translator(lambda p, s: b"", {})
    with pytest.raises(Unsupported, match="EM_RISCV kernel virtual addresses: .*VA_BITS"):
        make_translator(lambda p, s: b"", {}, riscv)


# --- the dumps -------------------------------------------------------------------------------

@pytest.fixture
def containers(make_vmcore, tmp_path):
    """A small vmcore and its outputs in every container: name -> path."""
    source, _ = make_vmcore(spec())
    out = {"elf": str(source)}
    for name, options in (("elf-out", SaveOptions(output_format="elf")),
                          ("zstd-seekable", SaveOptions(frame_bytes=64 << 10)),
                          ("kdump", SaveOptions(output_format="kdump", compress="zstd")),
                          ("kdump-flat", SaveOptions(output_format="kdump-flat", compress="zlib"))):
        path = tmp_path / f"d.{name}"
        save(str(source), str(path), options)
        out[name] = str(path)
    return out


def plain_segments(path):
    with FileSource(path) as source:
        return read_layout(source).segments


def test_each_detector_names_its_format(containers, tmp_path):
    for name, path in containers.items():
        expected = "elf" if name == "elf-out" else name
        assert detect(path) == (expected, None)
        assert detect_container(path) == expected
    plain = open(containers["elf"], "rb").read()
    gz = tmp_path / "d.flat.gz"
    gz.write_bytes(gzip.compress(open(containers["kdump-flat"], "rb").read(), 1))
    assert detect(str(gz)) == ("unknown", "gzip")
    import zstandard

    whole = tmp_path / "d.zst"
    whole.write_bytes(zstandard.ZstdCompressor().compress(plain))
    assert detect(str(whole)) == ("zstd", "zstd")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a dump" * 100)
    assert detect(str(garbage)) == ("unknown", None)
    cut = tmp_path / "cut.zelf"
    zelf = open(containers["zstd-seekable"], "rb").read()
    cut.write_bytes(zelf[:len(zelf) // 2])  # the seek table is at the end
    assert detect(str(cut))[0] == "zstd"


def test_one_dump_per_container_reads_the_bytes_of_the_plain_file(containers):
    source = containers["elf"]
    data = open(source, "rb").read()
    classes = {"elf": ElfDump, "elf-out": ElfDump, "zstd-seekable": ZelfDump, "kdump": KdumpDump,
               "kdump-flat": KdumpDump}
    for name, path in containers.items():
        with open_dump(path) as dump:
            assert type(dump) is classes[name]
            assert dump.container == ("elf" if name == "elf-out" else name)
            assert dump.describe()["container"] == dump.container
            assert dump.platform.machine == "EM_X86_64" and dump.platform.arch == "x86_64"
            assert dump.page_size == 4096 and dump.vmcoreinfo["OSRELEASE"]
            physical = dump.physical
            for seg in plain_segments(source):
                if seg.filesz:
                    assert physical.read(seg.paddr, seg.filesz) == data[seg.offset:seg.offset + seg.filesz], \
                        (name, hex(seg.paddr))
            # Memory the dump covers: what the ELF view's PT_LOADs cover, read the same way.
            covered = sum(size for _, size in physical.covered_ranges())
            assert covered >= sum(size for _, size in physical.stored_ranges()) > 0
            for seg in physical.segments:
                if seg.filesz:
                    assert physical.read_segment(seg, seg.paddr, 64) == physical.read(seg.paddr, 64)
            # The ELF view's own PT_LOADs hold the same bytes as the physical memory.
            view = dump.layout
            for seg in view.segments:
                if seg.filesz:
                    assert dump.pread(seg.offset, min(seg.filesz, 8192)) == \
                        physical.read(seg.paddr, min(seg.filesz, 8192))
    # The ELF view of a zelf file is what `zstd -d` writes, byte for byte.
    import zstandard

    with open(containers["zstd-seekable"], "rb") as f:
        plain = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    with open_dump(containers["zstd-seekable"]) as zelf:
        assert zelf.size == len(plain) and zelf.pread(0, zelf.size) == plain


def test_each_container_checks_itself(containers):
    # A flattened stream is written in one pass: its digests are "unknown".
    expected = {"elf-out": "xxh64", "zstd-seekable": "zstd checksums", "kdump": "xxh64",
                "kdump-flat": "unknown", "elf": "none"}
    for name, path in containers.items():
        with open_dump(path) as dump:
            assert dump.check()["digest"] == expected[name], name


def _flip(path, tmp_path, name, at_fraction=0.75):
    data = bytearray(open(path, "rb").read())
    at = int(len(data) * at_fraction)
    data[at] ^= 0x40
    flipped = tmp_path / f"flipped-{name}"
    flipped.write_bytes(bytes(data))
    return str(flipped)


@pytest.mark.parametrize("name", ["elf-out", "zstd-seekable", "kdump", "kdump-flat"])
def test_check_catches_a_flipped_byte_of_the_data(containers, tmp_path, name):
    flipped = _flip(containers[name], tmp_path, name)
    with pytest.raises(CorruptOutput):
        with open_dump(flipped) as dump:
            dump.check()


def test_what_open_dump_refuses(containers, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a dump" * 100)
    with pytest.raises(BadSource, match="not an ELF file"):
        open_dump(str(garbage))  # read as an ELF core: /proc/vmcore and devices are
    with pytest.raises(BadSource, match="not a dump vmcap reads"):
        open_dump(str(garbage), strict=True)
    gz = tmp_path / "d.flat.gz"
    gz.write_bytes(gzip.compress(open(containers["kdump-flat"], "rb").read(), 1))
    with pytest.raises(BadSource, match="`vmcap save` takes a compressed flattened stream"):
        open_dump(str(gz))
    with pytest.raises(Unsupported, match="no random access"):
        open_dump(str(gz), strict=True)


def test_the_dump_of_an_already_read_source_leaves_the_source_open(containers):
    from vmcap.source.dump import elf_dump

    with FileSource(containers["elf"]) as source:
        layout = read_layout(source)
        with elf_dump(layout, source) as dump:
            assert dump.physical.read(layout.segments[0].paddr, 16)
        assert source.pread(0, 4) == b"\x7fELF"  # still open


def test_one_read_error_type_per_layer(containers, tmp_path):
    """Reading a dump's physical memory fails the same way in every container: an address the
    dump does not hold is BadSource, stored bytes that do not decode are CorruptOutput."""
    for name, path in containers.items():
        with open_dump(path) as dump:
            end = max(start + size for start, size in dump.physical.covered_ranges())
            with pytest.raises(BadSource, match="not in the dump"):
                dump.physical.read(end + (1 << 30), 4096)
    # A zstd frame of the zelf's data flipped: its read is CorruptOutput, not a library error.
    damaged = tmp_path / "damaged.zelf"
    data = bytearray(open(containers["zstd-seekable"], "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(data)
    with open_dump(str(damaged)) as dump, pytest.raises(CorruptOutput):
        for start, length in dump.physical.stored_ranges():
            dump.physical.read(start, length)
    # A kdump page descriptor whose size is damaged: CorruptOutput too.
    damaged = tmp_path / "damaged.kdump"
    data = bytearray(open(containers["kdump"], "rb").read())
    with KdumpReader(containers["kdump"]) as reader:
        first = reader.descriptor_offset
    struct.pack_into("<i", data, first + 8, 1)  # page_desc_t.size of the first dumped page
    damaged.write_bytes(data)
    with open_dump(str(damaged)) as dump, pytest.raises(CorruptOutput):
        for start, length in dump.physical.stored_ranges():
            dump.physical.read(start, length)
