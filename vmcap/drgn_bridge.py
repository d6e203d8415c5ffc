"""drgn on any dump vmcap reads, without decompressing it: ``program_from_dump``.

    import vmcap.drgn_bridge
    prog = vmcap.drgn_bridge.program_from_dump("dump.zelf")
    prog.read(prog.symbol("linux_banner").address, 64)  # with debug info loaded

drgn reads physical memory through the Dump (vmcap.source.dump): one physical
memory segment per PT_LOAD of the dump's ELF view, added in program
header order as drgn adds a core dump's (a later segment takes precedence
where two overlap), each reading zeros past its stored bytes like an ELF
core's p_memsz. drgn translates kernel virtual addresses itself, from the
VMCOREINFO given to ``set_linux_kernel_custom`` (drgn 0.0.31+).
Debug info is the caller's: ``prog.load_debug_info([vmlinux])`` or
``prog.load_default_debug_info()``.
"""

from __future__ import annotations

from .api import open_dump
from .errors import Unsupported
from .source.dump import Dump

# ELF e_machine name -> drgn.Architecture member name.
_DRGN_ARCH = {
    "EM_X86_64": "X86_64",
    "EM_386": "I386",
    "EM_AARCH64": "AARCH64",
    "EM_ARM": "ARM",
    "EM_PPC64": "PPC64",
    "EM_RISCV": "RISCV64",
    "EM_S390": "S390X",
    "EM_LOONGARCH": "LOONGARCH64",
}


def drgn_platform(dump: Dump):
    """The drgn.Platform of a dump (architecture, word size, byte order)."""
    import drgn

    platform = dump.platform
    name = _DRGN_ARCH.get(platform.machine)
    if name == "RISCV64" and platform.elf_class == 32:
        name = "RISCV32"
    if name == "S390X" and platform.elf_class == 32:
        name = "S390"
    if name is None:
        raise Unsupported(f"{dump.path}: drgn has no architecture for {platform.machine}")
    flags = drgn.PlatformFlags(0)
    if platform.elf_class == 64:
        flags |= drgn.PlatformFlags.IS_64_BIT
    if platform.byte_order == "little":
        flags |= drgn.PlatformFlags.IS_LITTLE_ENDIAN
    return drgn.Platform(getattr(drgn.Architecture, name), flags)


def _segment_reader(dump: Dump, segment):
    physical = dump.physical

    def read(address, count, offset, is_physical):
        return physical.read_segment(segment, address, count)

    return read


def program_from_dump(dump_or_path):
    """A drgn.Program whose memory is the dump's, read through vmcap.

    ``dump_or_path``: a Dump (vmcap.open_dump), which stays the caller's to
    close, or what open_dump takes: that Dump lives as long as the
    Program's segment readers, which hold it.
    """
    try:
        import drgn
    except ImportError:
        raise Unsupported("drgn is not installed (pip install drgn)") from None
    dump = dump_or_path if isinstance(dump_or_path, Dump) else open_dump(dump_or_path)
    if not dump.vmcoreinfo_raw:
        raise Unsupported(f"{dump.path}: no VMCOREINFO, which drgn needs to read a kernel")
    if not hasattr(drgn.Program, "set_linux_kernel_custom"):
        raise Unsupported(f"drgn {getattr(drgn, '__version__', '?')} has no "
                          "Program.set_linux_kernel_custom (drgn 0.0.31 or later)")
    program = drgn.Program(drgn_platform(dump))
    for segment in dump.physical.segments:
        if segment.memsz:
            program.add_memory_segment(segment.paddr, segment.memsz,
                                       _segment_reader(dump, segment), physical=True)
    program.set_linux_kernel_custom(dump.vmcoreinfo_raw, False)
    return program
