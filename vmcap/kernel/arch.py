"""ELF machines and the architectures vmcap names them by.

The e_machine numbers vmcap knows, their readelf spellings, and per
architecture the name ``uname -m`` gives and the page size to assume when
VMCOREINFO does not say.
"""

from __future__ import annotations

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

# e_machine names, as readelf and pyelftools spell them; Layout.machine is the
# name, or the number (as text) for a machine not listed.
E_MACHINE_NAMES = {
    2: "EM_SPARC", EM_386: "EM_386", 4: "EM_68K", 8: "EM_MIPS", 15: "EM_PARISC",
    18: "EM_SPARC32PLUS", EM_PPC: "EM_PPC", EM_PPC64: "EM_PPC64", EM_S390: "EM_S390",
    EM_ARM: "EM_ARM", 42: "EM_SH", 43: "EM_SPARCV9", 50: "EM_IA_64", EM_X86_64: "EM_X86_64",
    EM_AARCH64: "EM_AARCH64", EM_RISCV: "EM_RISCV", EM_LOONGARCH: "EM_LOONGARCH",
    0x9026: "EM_ALPHA",
}

# Architecture names (as uname -m would say) and the page size to assume
# when VMCOREINFO does not say. ppc64 distribution kernels use 64 KiB pages.
ARCHES = {
    "EM_X86_64": ("x86_64", 4096),
    "EM_386": ("i386", 4096),
    "EM_AARCH64": ("aarch64", 4096),
    "EM_ARM": ("arm", 4096),
    "EM_PPC64": ("ppc64", 65536),
    "EM_PPC": ("ppc", 4096),
    "EM_S390": ("s390x", 4096),
    "EM_RISCV": ("riscv64", 4096),
    "EM_MIPS": ("mips", 4096),
    "EM_LOONGARCH": ("loongarch64", 16384),
    "EM_SPARCV9": ("sparc64", 8192),
    "EM_IA_64": ("ia64", 16384),
}
FALLBACK_PAGE_SIZE = 4096
