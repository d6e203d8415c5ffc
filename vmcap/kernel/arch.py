"""The dumped machine: one table of the machines vmcap knows, and a ``Platform`` per dump.

A dump says what machine it comes from in one of two ways: an ELF core by
its header (e_machine, class, data encoding), a kdump file by the utsname
machine in its header ("x86_64", "ppc64le", "aarch64_be"). ``make_platform``
turns either into one frozen ``Platform`` (the arch as ``uname -m`` says it,
ELF class, byte order, e_machine, readelf's name, the page size to assume
when VMCOREINFO does not say, the utsname a kdump header carries), and
``Platform.translator`` gives the kernel-virtual layer for a VMCOREINFO.
Every other table of machine names in vmcap derives from ``MACHINES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from ..errors import Unsupported
from .memory import struct_prefix

if TYPE_CHECKING:
    # Only the types: each walker loads when a dump of its machine needs it (make_translator),
    # not in every x86_64 capture.
    from .ppc64 import Ppc64Translator
    from .riscv64 import Riscv64Translator
    from .s390x import S390xTranslator
    from .translate import Aarch64Translator, X86_64Translator

    KernelTranslator = Union[X86_64Translator, Aarch64Translator, Ppc64Translator, S390xTranslator,
                             Riscv64Translator]

# e_machine values vmcap names (the writers and the sample builder use them).
EM_386 = 3
EM_PPC = 20
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243
EM_LOONGARCH = 258

FALLBACK_PAGE_SIZE = 4096


@dataclass(frozen=True)
class Machine:
    """One ELF machine: its names, its page size default, its kernel translator."""

    e_machine: int
    name: str  # as readelf and pyelftools spell it: "EM_X86_64"
    arch: str | None = None  # uname -m of its usual kernel; None: name without EM_, lowercase
    page_size: int = FALLBACK_PAGE_SIZE  # to assume when VMCOREINFO does not say
    utsname: str | None = None  # the kdump header names it matches (a regex), None: none
    kdump_name: str | None = None  # the utsname vmcap writes in a kdump header (default: arch)
    translator: str | None = None  # the kernel-virtual layer vmcap has for it

    def arch_for(self, elf_class: int, byte_order: str) -> str:
        """uname -m of a kernel of this machine, class and byte order."""
        if self.e_machine == EM_PPC64 and byte_order == "little":
            return "ppc64le"
        if self.e_machine == EM_S390 and elf_class == 32:
            return "s390"
        return self.arch or self.name.removeprefix("EM_").lower()


# ppc64 distribution kernels use 64 KiB pages, loongarch64 16 KiB.
MACHINES = (
    Machine(2, "EM_SPARC"),
    Machine(EM_386, "EM_386", "i386", utsname=r"i[3-6]86", kdump_name="i686"),
    Machine(4, "EM_68K"),
    Machine(8, "EM_MIPS", "mips"),
    Machine(15, "EM_PARISC"),
    Machine(18, "EM_SPARC32PLUS"),
    Machine(EM_PPC, "EM_PPC", "ppc", utsname=r"ppc"),
    Machine(EM_PPC64, "EM_PPC64", "ppc64", 65536, utsname=r"ppc64(le)?", translator="ppc64"),
    Machine(EM_S390, "EM_S390", "s390x", utsname=r"s390x?", translator="s390x"),
    Machine(EM_ARM, "EM_ARM", "arm", utsname=r"arm(?!64).*"),
    Machine(42, "EM_SH"),
    Machine(43, "EM_SPARCV9", "sparc64", 8192),
    Machine(50, "EM_IA_64", "ia64", 16384),
    Machine(EM_X86_64, "EM_X86_64", "x86_64", utsname=r"x86_64|x86-64|amd64", translator="x86_64"),
    Machine(EM_AARCH64, "EM_AARCH64", "aarch64", utsname=r"aarch64(_be)?|arm64", translator="aarch64"),
    Machine(EM_RISCV, "EM_RISCV", "riscv64", utsname=r"riscv64", translator="riscv64"),
    Machine(EM_LOONGARCH, "EM_LOONGARCH", "loongarch64", 16384, utsname=r"loongarch64"),
    Machine(0x9026, "EM_ALPHA"),
)
_BY_NUMBER = {m.e_machine: m for m in MACHINES}
_BY_NAME = {m.name.lower(): m for m in MACHINES}
# Machines a kdump file can only be written for as 64-bit kernels (makedumpfile has no 32-bit ports).
_KDUMP_64_ONLY = frozenset({EM_RISCV, EM_LOONGARCH})


@dataclass(frozen=True)
class Platform:
    """The dumped machine, built once per dump by make_platform."""

    arch: str  # as uname -m says it: "x86_64", "ppc64le", "aarch64"
    elf_class: int  # 32 or 64
    byte_order: str  # "little" or "big", of the kernel
    e_machine: int
    machine: str  # readelf's name, "EM_X86_64", or the number as text for a machine not listed
    default_page_size: int  # when VMCOREINFO does not say
    translator_kind: str | None  # "x86_64", "aarch64", "ppc64", "s390x", "riscv64" or None

    @property
    def struct_prefix(self) -> str:
        return struct_prefix(self.byte_order)

    @property
    def utsname(self) -> str:
        """The utsname machine a kdump header carries for this machine (crash checks it).

        crash compares utsname.machine with its own target (diskdump.c
        read_dump_header: "x86_64", "i686", "ppc64" prefix, "aarch64", ...)
        and refuses a dump for another machine, so this is the kernel's name,
        not ELF's.
        """
        known = _BY_NUMBER.get(self.e_machine)
        if known is None or known.utsname is None or (
                self.e_machine in _KDUMP_64_ONLY and self.elf_class != 64):
            raise Unsupported(f"kdump format: no utsname machine known for ELF e_machine "
                              f"{self.e_machine} (ELF{self.elf_class})")
        return known.kdump_name or self.arch

    def translator(self, read_physical, vmcoreinfo, *, fallback_phys_base: int | None = None):
        """The kernel-virtual layer over ``read_physical`` for this machine's kernel."""
        return make_translator(read_physical, vmcoreinfo, self, fallback_phys_base=fallback_phys_base)


def make_platform(*, elf_class: int, byte_order: str, e_machine: int | None = None,
                  utsname: str | None = None) -> Platform:
    """The Platform of a dump, from its ELF header's e_machine or its kdump header's utsname.

    A utsname no machine of the table matches is Unsupported (a kdump file
    of it has no ELF view); an e_machine not listed keeps its number.
    """
    if utsname is not None:
        known = machine_for_utsname(utsname)
        if known is None:
            raise Unsupported(f"kdump header machine {utsname!r} has no ELF machine vmcap knows")
    else:
        known = _BY_NUMBER.get(e_machine)
    if known is None:
        return Platform(arch=str(e_machine), elf_class=elf_class, byte_order=byte_order,
                        e_machine=e_machine, machine=str(e_machine),
                        default_page_size=FALLBACK_PAGE_SIZE, translator_kind=None)
    return Platform(arch=known.arch_for(elf_class, byte_order), elf_class=elf_class,
                    byte_order=byte_order, e_machine=known.e_machine, machine=known.name,
                    default_page_size=known.page_size, translator_kind=known.translator)


def machine_for_utsname(utsname: str) -> Machine | None:
    for known in MACHINES:
        if known.utsname is not None and re.fullmatch(known.utsname, utsname, re.IGNORECASE):
            return known
    return None


def platform_named(name: str) -> Platform:
    """The Platform a machine name stands for: readelf's ("EM_AARCH64") or a utsname
    ("aarch64_be", "ppc64"). A utsname says the byte order where it can (aarch64_be,
    ppc64 and s390x big, ppc64le little); an ELF name does not, and means little endian."""
    known = _BY_NAME.get(name.lower())
    if known is not None:
        return make_platform(elf_class=64, byte_order="little", e_machine=known.e_machine)
    known = machine_for_utsname(name)
    if known is None:
        return Platform(arch=name, elf_class=64, byte_order="little", e_machine=0, machine=name,
                        default_page_size=FALLBACK_PAGE_SIZE, translator_kind=None)
    lowered = name.lower()
    big = lowered.endswith("_be") or lowered == "ppc64" or known.e_machine == EM_S390
    elf_class = 32 if re.fullmatch(r"i[3-6]86|s390|arm.*|ppc", lowered) else 64
    return make_platform(elf_class=elf_class, byte_order="big" if big else "little",
                         e_machine=known.e_machine)


def make_translator(read_physical, vmcoreinfo, machine: Platform | str, *,
                    fallback_phys_base: int | None = None) -> KernelTranslator:
    """The kernel-virtual layer for a dump of the given machine.

    ``machine`` is the dump's Platform, or a name platform_named knows
    ("EM_X86_64", "aarch64_be", "ppc64le"); messages name the machine as
    given (a Platform by readelf's name).
    """
    platform = platform_named(machine) if isinstance(machine, str) else machine
    name = machine if isinstance(machine, str) else platform.machine
    kind = platform.translator_kind
    if kind == "x86_64":
        from .translate import X86_64Translator

        return X86_64Translator(read_physical, vmcoreinfo, fallback_phys_base=fallback_phys_base)
    try:
        if kind == "aarch64":
            from .translate import Aarch64Translator

            return Aarch64Translator(read_physical, vmcoreinfo, byte_order=platform.byte_order)
        if kind == "ppc64":
            from .ppc64 import make_ppc64_translator

            return make_ppc64_translator(read_physical, vmcoreinfo, platform.byte_order)
        if kind == "s390x":
            from .s390x import S390xTranslator

            return S390xTranslator(read_physical, vmcoreinfo)
        if kind == "riscv64":
            from .riscv64 import Riscv64Translator

            return Riscv64Translator(read_physical, vmcoreinfo)
    except Unsupported as e:
        # Say which architecture needed the key: the same key may be
        # optional elsewhere, and the dump may have been mislabelled.
        raise Unsupported(f"{name} kernel virtual addresses: {e}") from None
    raise Unsupported(f"kernel virtual addresses are only supported on x86_64, aarch64, ppc64, s390x "
                      f"and riscv64, not {name}")
