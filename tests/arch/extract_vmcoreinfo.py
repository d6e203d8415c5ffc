#!/usr/bin/env python3
"""extract_vmcoreinfo.py DUMP.elf OUT.txt: the kernel's in-memory VMCOREINFO as a file for -i.

pseries and s390-ccw-virtio guests have no QEMU vmcoreinfo device, so their dump-guest-memory
ELF carries no VMCOREINFO note. The kernel keeps its own note (vmcoreinfo_note, the buffer that
/sys/kernel/notes and /sys/kernel/vmcoreinfo point at) in memory: an ELF note header
(namesz=11, type 0) in the kernel's byte order followed by "VMCOREINFO\\0\\0" and the text.
This finds it by its name and the first key, checks the header in either byte order and writes
the text with a final newline, as /sys/kernel/vmcoreinfo's buffer holds it (what makedumpfile -g
would write).
"""
import mmap
import re
import struct
import sys


def main(dump: str, out: str) -> None:
    with open(dump, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for match in re.finditer(rb"VMCOREINFO\x00\x00OSRELEASE=", m):
            header = match.start() - 12
            for order in "<>":
                namesz, descsz, _type = struct.unpack_from(order + "III", m, header)
                if namesz == 11 and 0 < descsz < 65536:
                    text = bytes(m[header + 24:header + 24 + descsz]).split(b"\0", 1)[0]
                    with open(out, "wb") as o:
                        o.write(text if text.endswith(b"\n") else text + b"\n")
                    print(f"{out}: {len(text)} bytes of VMCOREINFO (note header {'LE' if order == '<' else 'BE'}) "
                          f"at file offset {header:#x}")
                    return
    raise SystemExit(f"{dump}: no VMCOREINFO note in memory")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
