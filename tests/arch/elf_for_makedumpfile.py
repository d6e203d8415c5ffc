#!/usr/bin/env python3
"""elf_for_makedumpfile.py IN.elf OUT.elf [--little-endian-headers]

A copy of a QEMU 7.2 dump-guest-memory ELF that makedumpfile 1.7.2 reads:
- its program headers move to offset 64 (makedumpfile reads program header i at 64 + 56 * i,
  QEMU puts them at 192; the lab's elf_phdr_first.py does the same);
- with --little-endian-headers, the ELF header, program headers and note headers are rewritten
  little-endian in place: QEMU 7.2 writes pseries dumps of a little-endian guest with big-endian
  headers, and makedumpfile on ppc64le reads the headers natively. Note descriptors and memory
  are left as they are.
No data byte moves; only header bytes differ from IN.
"""
import shutil
import struct
import sys


def main(src: str, dst: str, little: bool) -> None:
    with open(src, "rb") as f:
        ehdr = bytearray(f.read(64))
        order = "<" if ehdr[5] == 1 else ">"
        phoff = struct.unpack_from(order + "Q", ehdr, 32)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", ehdr, 54)
        f.seek(phoff)
        phdrs = [struct.unpack_from(order + "IIQQQQQQ", f.read(phentsize)) for _ in range(phnum)]
        notes = []
        for p in phdrs:
            if p[0] == 4:
                f.seek(p[2])
                notes.append((p[2], bytearray(f.read(p[5]))))
    first_data = min(p[2] for p in phdrs)
    if 64 + phnum * 56 > first_data:
        raise SystemExit(f"no room for {phnum} program headers before offset {first_data:#x}")
    out = "<" if little else order
    shutil.copyfile(src, dst)
    e = struct.unpack_from(order + "HHIQQQIHHHHHH", ehdr, 16)
    e_type, e_machine, e_version, e_entry, _phoff, _shoff, e_flags, e_ehsize, _, _, _, _, _ = e
    if little:
        ehdr[5] = 1
    struct.pack_into(out + "HHIQQQIHHHHHH", ehdr, 16, e_type, e_machine, e_version, e_entry, 64, 0,
                     e_flags, e_ehsize, 56, phnum, 0, 0, 0)
    with open(dst, "r+b") as f:
        f.write(ehdr)
        for p in phdrs:
            f.write(struct.pack(out + "IIQQQQQQ", *p))
        f.write(b"\0" * (min(first_data, phoff + phnum * phentsize) - f.tell()))
        for offset, data in notes:
            at = 0
            while at + 12 <= len(data):
                namesz, descsz, ntype = struct.unpack_from(order + "III", data, at)
                struct.pack_into(out + "III", data, at, namesz, descsz, ntype)
                at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
            f.seek(offset)
            f.write(data)
    print(f"{dst}: program headers at 64{', headers little-endian' if little and order == '>' else ''}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--little-endian-headers" in sys.argv[3:])
