"""The sample vmcore builder: valid ELF, kernel-like layout, poison where no RAM is, content an oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tracemalloc
import zlib
from dataclasses import replace

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcap.sample import (
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_PPC,
    EM_PPC64,
    EM_S390,
    EM_X86_64,
    POISON,
    RamRange,
    SampleSpec,
    build_vmcore,
    content_blocks,
    demo_spec,
    expected_bytes,
    page_kinds,
    pattern_word,
    plan_sample,
    prstatus_size,
)

# Fractional pages of every kind, plus an overlap: small enough to read whole.
FRACTIONAL_RANGES = (
    RamRange(0x1000, 0x9FC00 - 0x1000),  # ends mid-page
    RamRange(0x100000, 0x40000),
    RamRange(0x120000, 0x8000, vaddr=0xFFFFFFFF81000000),  # overlaps the previous one
    RamRange(0x200400, 0x3C00),  # starts mid-page
    RamRange(0x300100, 0x200),  # sub-page
    RamRange(0x400000, 0x2800),  # ...-0x4027ff
    RamRange(0x402800, 0x1800),  # 0x402800-..., same page
)


def spec_with(**changes) -> SampleSpec:
    values = dict(ranges=FRACTIONAL_RANGES, content="pattern")
    values.update(changes)
    if values.get("elf_class") == 32:  # no kernel-text vaddr above 4 GiB
        values["ranges"] = tuple(replace(r, vaddr=None) for r in values["ranges"])
    return SampleSpec(**values)


ELF_VARIANTS = {
    "elf64-le-x86_64": dict(),
    "elf32-be-ppc": dict(elf_class=32, byte_order="big", machine=EM_PPC),
    "elf64-le-aarch64-64k": dict(machine=EM_AARCH64, page_size=65536),
    "elf64-be-ppc64-64k": dict(byte_order="big", machine=EM_PPC64, page_size=65536),
    "elf32-le-i386": dict(elf_class=32, machine=EM_386),
}

MACHINE_NAMES = {EM_X86_64: "EM_X86_64", EM_PPC: "EM_PPC", EM_AARCH64: "EM_AARCH64",
                 EM_PPC64: "EM_PPC64", EM_386: "EM_386"}


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def segment_data_mask(info) -> np.ndarray:
    mask = np.zeros(info.file_size, dtype=bool)
    for seg in info.segments:
        mask[seg.offset:seg.offset + seg.filesz] = True
    return mask


# ---------------------------------------------------------------- ELF validity


@pytest.mark.parametrize("variant", ELF_VARIANTS)
def test_pyelftools_reads_headers_segments_and_notes(tmp_path, variant):
    spec = spec_with(**ELF_VARIANTS[variant], cpus=3)
    info = build_vmcore(tmp_path / "vmcore", spec)
    with open(info.path, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == spec.elf_class
        assert elf.little_endian == (spec.byte_order == "little")
        assert elf["e_type"] == "ET_CORE"
        assert elf["e_version"] == "EV_CURRENT"
        assert elf["e_ident"]["EI_VERSION"] == "EV_CURRENT"
        assert elf["e_ident"]["EI_OSABI"] == "ELFOSABI_SYSV"
        assert elf["e_ehsize"] == (64 if spec.elf_class == 64 else 52)
        assert elf["e_phentsize"] == (56 if spec.elf_class == 64 else 32)
        assert elf["e_machine"] == MACHINE_NAMES[spec.machine]
        segments = list(elf.iter_segments())
        assert [s["p_type"] for s in segments] == ["PT_NOTE"] + ["PT_LOAD"] * len(spec.ranges)

        note = segments[0]
        assert (note["p_offset"], note["p_filesz"], note["p_align"]) == (info.notes_offset, info.notes_size, 0)
        notes = list(note.iter_notes())
        assert [n["n_name"] for n in notes] == ["CORE"] * 3 + ["VMCOREINFO"]
        assert [n["n_type"] for n in notes[:3]] == ["NT_PRSTATUS"] * 3
        assert all(n["n_descsz"] == prstatus_size(spec.machine, spec.elf_class) for n in notes[:3])
        text = notes[3]["n_descdata"].decode()
        assert f"PAGESIZE={spec.page_size}\n" in text
        assert text.startswith("OSRELEASE=6.1.0-vmcap-sample\n")

        for seg, phdr in zip(info.segments, segments[1:]):
            assert elf.get_segment(seg.index) is not None
            assert (phdr["p_paddr"], phdr["p_vaddr"], phdr["p_offset"], phdr["p_filesz"],
                    phdr["p_memsz"], phdr["p_flags"], phdr["p_align"]) == \
                (seg.paddr, seg.vaddr, seg.offset, seg.filesz, seg.memsz, 7, 0)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
@pytest.mark.parametrize("variant", ELF_VARIANTS)
def test_readelf_accepts_without_warnings(tmp_path, variant):
    spec = spec_with(**ELF_VARIANTS[variant])
    info = build_vmcore(tmp_path / "vmcore", spec)
    result = subprocess.run(["readelf", "-h", "-l", "-n", "-W", str(info.path)],
                            capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert "CORE (Core file)" in result.stdout
    assert result.stdout.count("\n  LOAD ") == len(spec.ranges)
    assert result.stdout.count("NT_PRSTATUS") == spec.cpus
    assert "VMCOREINFO" in result.stdout


def test_vmcoreinfo_note_is_where_info_says(tmp_path):
    spec = spec_with(vmcoreinfo={"OSRELEASE": "5.14.0", "PAGESIZE": "4096"})
    info = build_vmcore(tmp_path / "vmcore", spec)
    data = read_file(info.path)
    desc = data[info.vmcoreinfo_offset:info.vmcoreinfo_offset + info.vmcoreinfo_size]
    assert desc == b"OSRELEASE=5.14.0\nPAGESIZE=4096\n"


def test_empty_vmcoreinfo_dict_means_no_vmcoreinfo_note(tmp_path):
    info = build_vmcore(tmp_path / "vmcore", spec_with(vmcoreinfo={}, cpus=1))
    with open(info.path, "rb") as f:
        names = [n["n_name"] for n in ELFFile(f).get_segment(0).iter_notes()]
    assert names == ["CORE"]
    assert info.vmcoreinfo_offset is None


def test_no_cpus_and_no_vmcoreinfo_gives_an_empty_note_segment(tmp_path):
    info = build_vmcore(tmp_path / "vmcore", spec_with(vmcoreinfo={}, cpus=0))
    assert info.notes_size == 0
    with open(info.path, "rb") as f:
        assert ELFFile(f).get_segment(0)["p_type"] == "PT_NOTE"


@pytest.mark.parametrize("machine, elf_class, size", [
    (EM_X86_64, 64, 336), (EM_386, 32, 144), (EM_AARCH64, 64, 392),
    (EM_PPC64, 64, 504), (EM_S390, 64, 336), (EM_ARM, 32, 148),
])
def test_prstatus_size_matches_the_kernel_struct(machine, elf_class, size):
    assert prstatus_size(machine, elf_class) == size


def test_phdrs_can_sit_away_from_the_elf_header(tmp_path):
    info = build_vmcore(tmp_path / "vmcore", spec_with(phoff=192, layout="packed"))
    data = read_file(info.path)
    assert data[64:192] == bytes(128)
    with open(info.path, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_phoff"] == 192
        assert [s["p_offset"] for s in list(elf.iter_segments())[1:]] == [s.offset for s in info.segments]
    assert info.notes_offset == 192 + 56 * (1 + len(FRACTIONAL_RANGES))


def test_elf32_refuses_addresses_beyond_4_gib(tmp_path):
    spec = SampleSpec(ranges=(RamRange(0x100000000, 0x1000),), elf_class=32, machine=EM_386)
    with pytest.raises(ValueError, match="segment at paddr 0x100000000 does not fit an ELF32"):
        build_vmcore(tmp_path / "vmcore", spec)


@pytest.mark.parametrize("bad", [dict(layout="sparse"), dict(content="ones"), dict(page_size=3000),
                                 dict(elf_class=16), dict(byte_order="middle"), dict(phoff=10)])
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValueError):
        spec_with(**bad)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_proc_layout_chunks_are_page_rounded_and_back_to_back(tmp_path, page_size):
    info = plan_sample(spec_with(page_size=page_size))
    ps = page_size
    assert info.notes_offset % ps == 0
    chunk_start = info.notes_offset + -(-info.notes_size // ps) * ps
    for seg in info.segments:
        assert (seg.offset - seg.paddr) % ps == 0
        assert seg.offset - chunk_start == seg.paddr % ps
        chunk_start += -(-(seg.paddr + seg.memsz) // ps) * ps - seg.paddr // ps * ps
    assert info.file_size == chunk_start


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_proc_layout_every_non_segment_byte_in_chunks_is_poison(tmp_path, page_size):
    info = build_vmcore(tmp_path / "vmcore", spec_with(page_size=page_size, content="mixed"))
    data = np.frombuffer(read_file(info.path), dtype=np.uint8)
    assert len(data) == info.file_size
    outside = ~segment_data_mask(info)
    outside[:info.notes_offset + info.notes_size] = False
    assert outside.any()
    assert (data[outside] == POISON[0]).all()
    listed = np.zeros(info.file_size, dtype=bool)
    for offset, length in info.non_ram_file_ranges:
        listed[offset:offset + length] = True
    assert (listed == outside).all()


def test_packed_layout_puts_segments_back_to_back_after_the_notes():
    info = plan_sample(spec_with(layout="packed"))
    at = info.notes_offset + info.notes_size
    for seg in info.segments:
        assert seg.offset == at
        at += seg.filesz
    assert info.file_size == at
    assert info.non_ram_file_ranges == ()
    assert any((s.offset - s.paddr) % 4096 for s in info.segments)


def test_aligned_layout_puts_each_segment_at_a_page_aligned_offset(tmp_path):
    info = build_vmcore(tmp_path / "vmcore", spec_with(layout="aligned"))
    assert all(seg.offset % 4096 == 0 for seg in info.segments)
    assert any((seg.offset - seg.paddr) % 4096 for seg in info.segments)
    data = np.frombuffer(read_file(info.path), dtype=np.uint8)
    outside = ~segment_data_mask(info)
    outside[:info.notes_offset + info.notes_size] = False
    assert (data[outside] == POISON[0]).all()


@pytest.mark.parametrize("layout", ["proc", "packed", "aligned"])
def test_filesz_below_memsz_writes_only_filesz(tmp_path, layout):
    spec = SampleSpec(ranges=(RamRange(0x1000, 0x5000, filesz=0x2800), RamRange(0x9000, 0x1000)),
                      layout=layout, content="pattern")
    info = build_vmcore(tmp_path / "vmcore", spec)
    first = info.segments[0]
    assert (first.filesz, first.memsz) == (0x2800, 0x5000)
    data = read_file(info.path)
    assert data[first.offset:first.offset + first.filesz] == expected_bytes(spec, 0x1000, 0x2800)
    if layout == "proc":
        # the chunk still spans memsz, as fs/proc/vmcore.c would round it; the rest is poison
        assert data[first.offset + first.filesz:first.offset + first.memsz] == POISON * 0x2800
        assert info.segments[1].offset == first.offset + 0x5000


# ---------------------------------------------------------------- content


@pytest.mark.parametrize("layout", ["proc", "packed", "aligned"])
@pytest.mark.parametrize("content", ["pattern", "mixed", "zero"])
def test_segment_file_data_is_expected_bytes(tmp_path, layout, content):
    spec = spec_with(layout=layout, content=content, byte_order="big" if layout == "aligned" else "little")
    info = build_vmcore(tmp_path / "vmcore", spec)
    data = read_file(info.path)
    for seg in info.segments:
        assert data[seg.offset:seg.offset + seg.filesz] == expected_bytes(spec, seg.paddr, seg.filesz), seg


def test_overlapping_segments_hold_the_same_bytes(tmp_path):
    info = build_vmcore(tmp_path / "vmcore", spec_with(content="mixed"))
    data = read_file(info.path)
    ram, text = info.segments[1], info.segments[2]
    at = text.paddr - ram.paddr
    assert data[ram.offset + at:ram.offset + at + text.filesz] == data[text.offset:text.offset + text.filesz]


@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_pattern_words_encode_their_physical_address(byte_order):
    spec = spec_with(byte_order=byte_order)
    for paddr in (0, 8, 0x1000, 0xA5A5A5A5A0, 0x123456789ABCDE8, (1 << 20) - 8, 1 << 20):
        assert expected_bytes(spec, paddr, 8) == pattern_word(paddr).to_bytes(8, byte_order)
    words = {pattern_word(p) for p in range(0, 1 << 16, 8)}
    assert len(words) == (1 << 16) // 8


@pytest.mark.parametrize("content", ["pattern", "mixed"])
def test_ram_content_never_contains_poison(content):
    spec = spec_with(content=content)
    # pattern: addresses whose bytes are 0xa5 in every position; mixed: 4096 pages of every kind
    starts = (0xA5A5A5A5A5A5A0, 0xA5A5A5A5A5A5A5 & ~0xFFFFF, 0)
    for paddr in starts:
        assert POISON not in expected_bytes(spec, paddr, 1 << 24)


@settings(max_examples=60, deadline=None)
@given(content=st.sampled_from(["pattern", "mixed"]),
       byte_order=st.sampled_from(["little", "big"]),
       page_size=st.sampled_from([4096, 65536]),
       block=st.integers(0, 1 << 20),
       delta=st.integers(-(1 << 17), 1 << 17),
       length=st.integers(1, 1 << 19),
       cut=st.integers(0, 1 << 19))
def test_content_is_a_function_of_paddr_alone(content, byte_order, page_size, block, delta, length, cut):
    spec = spec_with(content=content, byte_order=byte_order, page_size=page_size)
    paddr = max(0, (block << 20) + delta)  # near 1 MiB generation-block boundaries
    cut = min(cut, length)
    whole = expected_bytes(spec, paddr, length)
    assert len(whole) == length
    assert expected_bytes(spec, paddr, cut) + expected_bytes(spec, paddr + cut, length - cut) == whole


def test_content_blocks_are_at_most_one_mib():
    spec = spec_with(content="mixed")
    sizes = [len(b) for b in content_blocks(spec, 0x123, 5 << 20)]
    assert sum(sizes) == 5 << 20 and max(sizes) <= 1 << 20


def test_mixed_content_is_a_realistic_page_mix():
    spec = spec_with(content="mixed", seed=7)
    pages = 4096
    data = np.frombuffer(expected_bytes(spec, 0, pages * 4096), dtype=np.uint8).reshape(pages, 4096)
    kinds = page_kinds(spec, 0, pages)
    zero_pages = ~data.any(axis=1)
    assert (zero_pages == (kinds == 0)).all()
    assert 0.4 < zero_pages.mean() < 0.6

    def ratio(kind):
        rows = np.flatnonzero(kinds == kind)[:64]
        assert len(rows) > 16
        return np.mean([len(zlib.compress(data[r].tobytes())) / 4096 for r in rows])

    assert 0.4 < ratio(1) < 0.75  # text: about like kernel .text
    assert ratio(2) > 0.99  # random: incompressible
    assert ratio(3) < 0.2  # sparse pointers
    # no two non-zero pages repeat, so long-window compressors get no free ride
    nonzero = {data[r].tobytes() for r in np.flatnonzero(~zero_pages)}
    assert len(nonzero) == (~zero_pages).sum()


def test_mixed_content_depends_on_the_seed():
    a = expected_bytes(spec_with(content="mixed", seed=1), 0, 1 << 20)
    b = expected_bytes(spec_with(content="mixed", seed=2), 0, 1 << 20)
    assert a != b
    assert a == expected_bytes(spec_with(content="mixed", seed=1), 0, 1 << 20)


# ---------------------------------------------------------------- streaming


def test_build_streams_with_bounded_memory(tmp_path):
    spec = SampleSpec(ranges=(RamRange(0x100000, 64 << 20),), content="mixed")
    build_vmcore(tmp_path / "warm", SampleSpec(ranges=(RamRange(0, 4096),)))  # pools, templates
    tracemalloc.start()
    try:
        build_vmcore(tmp_path / "vmcore", spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_zero_content_of_4_gib_is_written_as_holes_quickly(tmp_path):
    spec = SampleSpec(ranges=(RamRange(0x100000, 4 << 30),), content="zero")
    started = time.monotonic()
    info = build_vmcore(tmp_path / "vmcore", spec)
    assert time.monotonic() - started < 5
    st_ = os.stat(info.path)
    assert st_.st_size == info.file_size > 4 << 30
    assert st_.st_blocks * 512 < 64 << 20


# ---------------------------------------------------------------- the demo


def test_demo_spec_has_every_fractional_situation():
    spec = demo_spec()
    info = plan_sample(spec)
    ps = spec.page_size
    segs = info.segments
    assert spec.layout == "proc" and spec.machine == EM_X86_64 and spec.content == "mixed"
    assert info.file_size < 32 << 20
    assert all(s.filesz == s.memsz for s in segs)  # /proc/vmcore never has memsz-only tails

    def end(s):
        return s.paddr + s.memsz

    assert any(end(s) % ps and s.memsz > ps for s in segs), "a segment ending mid-page"
    assert any(s.paddr % ps and s.memsz > ps for s in segs), "a segment starting mid-page"
    assert any(s.memsz < ps and s.paddr // ps == (end(s) - 1) // ps for s in segs), "a sub-page segment"
    assert any(end(a) <= b.paddr and (end(a) - 1) // ps == b.paddr // ps
               for a in segs for b in segs), "two segments sharing a page"
    text = [s for s in segs if s.vaddr >= 0xFFFFFFFF80000000]
    assert len(text) == 1
    assert any(r is not text[0] and r.paddr <= text[0].paddr and end(text[0]) <= end(r)
               for r in segs), "kernel text overlaps RAM"


def test_demo_builds_a_valid_vmcore(tmp_path):
    info = build_vmcore(tmp_path / "demo", demo_spec())
    assert os.path.getsize(info.path) == info.file_size
    with open(info.path, "rb") as f:
        elf = ELFFile(f)
        assert elf.num_segments() == 1 + len(demo_spec().ranges)
        assert sum(1 for n in elf.get_segment(0).iter_notes() if n["n_type"] == "NT_PRSTATUS") == 4
    data = read_file(info.path)
    for seg in info.segments:
        assert data[seg.offset:seg.offset + seg.filesz] == info.expected_bytes(seg.paddr, seg.filesz)
