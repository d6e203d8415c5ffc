"""Which pages a dump level leaves out: makedumpfile's -d 2/4/8/16, from VMCOREINFO alone.

makedumpfile (makedumpfile.c __exclude_unnecessary_pages) walks the crashed
kernel's struct pages in pfn order and, for each page that is not a compound
tail, tests in this order:

    FREE           buddy page (page type PAGE_BUDDY_MAPCOUNT_VALUE, not slab):
                   excludes 1 << page.private pfns                      (-d 16)
                   unaccepted page (6.16+): 1 << MAX_PAGE_ORDER pfns    (-d 16)
    CACHE          LRU or swap cache, not PG_private, not anonymous     (-d 2)
    CACHE_PRIVATE  LRU or swap cache, not anonymous                     (-d 4)
    USER           anonymous (mapping & 1, not slab) or hugetlbfs      (-d 8)
    HWPOISON       PG_hwpoison                                          (always)
    OFFLINE        page type PAGE_OFFLINE_MAPCOUNT_VALUE (balloon, virtio-mem)
                                                                        (always)

A compound head excludes its whole compound page (1 << order pfns, the order
read from the first tail page); the walk then jumps past the excluded range,
so pages inside it are never looked at. Here the same rules run on numpy
arrays, one chunk of struct pages at a time, and the jump is reproduced by
dropping every claim that starts inside an earlier accepted range.

Where the order and the hugetlb mark live changed several times; the variant
is chosen once from the VMCOREINFO keys the kernel wrote (page_rules):

    6.9+       order = low byte of the first tail's flags (folio._flags_1);
               hugetlb = head page type PAGE_HUGETLB_MAPCOUNT_VALUE
    6.6-6.8    order likewise; hugetlb = NUMBER(PG_hugetlb) bit in _flags_1
    6.3-6.5    OFFSET(folio._folio_order/_folio_dtor) - SIZE(page) in the first tail;
               hugetlb = dtor == NUMBER(HUGETLB_PAGE_DTOR)
    4.4-6.2    OFFSET(page.compound_order/compound_dtor) in the first tail
               (one byte from 4.16, two before); hugetlb likewise by dtor
    6.10+      slab is the page type PAGE_SLAB_MAPCOUNT_VALUE, before it PG_slab
    6.12+      page types are PGTY_x << 24; compared for equality like the
               older ~PG_x values (makedumpfile 72c3414)
    7.1+       OFFSET(page.compound_info) replaces OFFSET(page.compound_head)

A key the chosen rules need but the kernel did not write raises Unsupported
naming it, rather than quietly keeping or dropping the wrong pages.

Only SPARSEMEM (the mem_section tree; vmemmap or not) is handled, on the
architectures vmcap.kernel.translate translates; struct pages are read in the kernel's
byte order (big on s390x).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import BadSource, SourceIOError, Unsupported
from . import vmcoreinfo as vi
from .arch import make_translator
from .dumplevel import EXCLUDED_CLASSES, KERNEL_CLASSES, DumpLevel, ExclusionCounts
from .memory import struct_prefix

ReadPhysical = Callable[[int, int], bytes]
ReadVirtual = Callable[[int, int], bytes]
# (address, size) -> a context manager giving those bytes mapped, not copied; None where they cannot be.
MapPhysical = Callable[[int, int], "AbstractContextManager | None"]
MapVirtual = MapPhysical

# Page classes, in makedumpfile's test order; 0 means "dumped".
KEPT, FREE, CACHE, CACHE_PRIVATE, USER, HWPOISON, OFFLINE = range(7)
CLASS_NAMES = ("kept", *EXCLUDED_CLASSES)

# makedumpfile reads struct pages PGMM_CACHED at a time and only looks for a
# compound head's order in the same batch: a head in the last slot gets order 0.
PGMM_CACHED = 512
PAGE_MAPPING_ANON = 0x1
TAIL_PAGE_MARK = 0x1  # compound_head & 1: this is a tail page
# section_mem_map low bits are flags (SECTION_MARKED_PRESENT, ...); makedumpfile
# masks the kernel's largest SECTION_MAP_LAST_BIT (1 << 5) on every version.
SECTION_MARKED_PRESENT = 0x1
SECTION_MAP_MASK = ~0x1F & 0xFFFF_FFFF_FFFF_FFFF
POINTER_BYTES = 8
KERNEL_HALF = 1 << 63  # x86_64 kernel addresses have the top bit set
X86_64_DEFAULT_MAX_PHYSMEM_BITS = {False: 46, True: 52}  # by 5-level paging
# Orders beyond this exceed any pfn range; capping keeps 1 << order in int64.
ORDER_CAP = 40
# struct page is 64 bytes on most configurations, 80-odd with debugging options.
MAX_STRUCT_PAGE_BYTES = 1024
# The walk keeps one bit per pfn and one list entry per mem_section up to the
# dump's highest pfn: 2**34 pfns (64 TiB of 4 KiB pages) is a 2 GiB bitmap, and
# 2**20 sections (128 TiB of x86_64 sections) a few seconds of Python.
MAX_CLASSIFIED_PFNS = 1 << 34
MAX_MEM_SECTIONS = 1 << 20


# --- rules: what VMCOREINFO says about struct page ----------------------------------


@dataclass(frozen=True)
class CompoundLayout:
    """Where a compound head's order and hugetlb mark are, in the first tail page.

    order_offset/order_bytes locate the order inside the tail's struct page
    (on 6.6+ that is the low byte of its flags, folio._flags_1). At most one
    hugetlb test is set; none means the kernel has no hugetlb pages
    (CONFIG_HUGETLB_PAGE off).
    """

    order_offset: int
    order_bytes: int
    hugetlb_head_type: int | None = None       # 6.9+: head page type
    hugetlb_tail_flag_bit: int | None = None   # 6.6-6.8: PG_hugetlb in _flags_1
    dtor_offset: int | None = None             # 4.4-6.5: compound destructor id
    dtor_bytes: int = 1
    hugetlb_dtor: int | None = None


@dataclass(frozen=True)
class PageRules:
    """Everything the classifier needs, looked up from VMCOREINFO once.

    Offsets are within struct page; page-type values are the 32-bit pattern
    of page._mapcount (page_type) for that type. None: the kernel does not
    have that flag or type.
    """

    dump_level: DumpLevel
    struct_page_size: int
    flags_offset: int
    mapping_offset: int
    mapcount_offset: int
    private_offset: int
    compound_head_offset: int
    head_mask: int
    lru_bit: int | None = None
    private_bit: int | None = None
    swapcache_bit: int | None = None
    swapbacked_bit: int | None = None
    hwpoison_bit: int | None = None
    slab_bit: int | None = None
    slab_type: int | None = None
    buddy_type: int | None = None
    offline_type: int | None = None
    unaccepted_type: int | None = None
    free_area_orders: int | None = None  # LENGTH(zone.free_area) = NR_PAGE_ORDERS
    compound: CompoundLayout | None = None


def kernel_version(osrelease: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) from OSRELEASE such as "6.1.0-56-amd64"."""
    # A damaged note may hold any number of digits; no kernel version has more than a few.
    found = re.match(r"(\d{1,9})\.(\d{1,9})(?:\.(\d{1,9}))?(?!\d)", osrelease or "")
    if not found:
        return None
    return int(found[1]), int(found[2]), int(found[3] or 0)


def _type_value(info: vi.VmcoreInfo, name: str) -> int | None:
    # Printed with %ld: ~PG_x is negative, PGTY_x << 24 may be either sign;
    # page_type is a 32-bit field, so compare the low 32 bits.
    value = vi.number(info, name)
    return None if value is None else value & 0xFFFF_FFFF


def _page_flag(info: vi.VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """NUMBER(PG_x): a bit number in the 64-bit page.flags; BadSource if it is not one."""
    bit = vi.number(info, name, required=required)
    if bit is not None and not 0 <= bit < 64:
        raise BadSource(f"VMCOREINFO NUMBER({name})={bit} is not a bit of page.flags (0-63)")
    return bit


def _first_offset(info: vi.VmcoreInfo, *names: str) -> int:
    for name in names:
        value = vi.offset(info, name)
        if value is not None:
            return value
    return vi.offset(info, names[0], required=True)


def compound_layout(info: vi.VmcoreInfo) -> CompoundLayout:
    """Where this kernel keeps a compound page's order and hugetlb mark (see the module doc)."""
    flags_offset = vi.offset(info, "page.flags", required=True)
    hugetlb_type = _type_value(info, "PAGE_HUGETLB_MAPCOUNT_VALUE")
    if hugetlb_type is not None:
        return CompoundLayout(flags_offset, 1, hugetlb_head_type=hugetlb_type)
    pg_hugetlb = _page_flag(info, "PG_hugetlb")
    if pg_hugetlb is not None:
        return CompoundLayout(flags_offset, 1, hugetlb_tail_flag_bit=pg_hugetlb)
    hugetlb_dtor = vi.number(info, "HUGETLB_PAGE_DTOR")  # absent without CONFIG_HUGETLB_PAGE
    folio_order = vi.offset(info, "folio._folio_order")
    if folio_order is not None:
        page_size = vi.size(info, "page", required=True)
        folio_dtor = vi.offset(info, "folio._folio_dtor")
        return CompoundLayout(
            folio_order - page_size, 1,
            dtor_offset=None if folio_dtor is None else folio_dtor - page_size,
            hugetlb_dtor=hugetlb_dtor if folio_dtor is not None else None,
        )
    version = kernel_version(info.get("OSRELEASE"))
    compound_order = vi.offset(info, "page.compound_order")
    if compound_order is not None:
        if version is None:
            raise Unsupported("VMCOREINFO lacks OSRELEASE (needed for the width of page.compound_order)")
        if version < (4, 4, 0):
            raise Unsupported(f"kernel {vi.shown(info['OSRELEASE'])}: compound pages before 4.4 "
                              "are not supported")
        width = 1 if version >= (4, 16, 0) else 2
        compound_dtor = vi.offset(info, "page.compound_dtor")
        return CompoundLayout(
            compound_order, width,
            dtor_offset=compound_dtor, dtor_bytes=width,
            hugetlb_dtor=hugetlb_dtor if compound_dtor is not None else None,
        )
    if version is not None and version >= (6, 6, 0):
        # 6.6-6.8 without CONFIG_HUGETLB_PAGE export neither PG_hugetlb nor
        # an order offset: the order is in _flags_1 and there is no hugetlb.
        return CompoundLayout(flags_offset, 1)
    raise Unsupported("VMCOREINFO lacks OFFSET(page.compound_order) (and folio._folio_order, "
                      "PG_hugetlb, PAGE_HUGETLB_MAPCOUNT_VALUE): cannot size compound pages")


def page_rules(info: vi.VmcoreInfo, dump_level: DumpLevel | int) -> PageRules:
    """The classification rules for this kernel and dump level; Unsupported names a missing key.

    Only what the requested bits need is required: -d 16 alone does not need
    the compound layout, -d 2 does not need the buddy page type.
    """
    dump_level = DumpLevel.of(dump_level)
    wants_cache = bool(dump_level & (DumpLevel.CACHE | DumpLevel.CACHE_PRIVATE))
    wants_user = bool(dump_level & DumpLevel.USER)
    wants_free = bool(dump_level & DumpLevel.FREE)

    slab_type = _type_value(info, "PAGE_SLAB_MAPCOUNT_VALUE")  # 6.10+
    slab_bit = _page_flag(info, "PG_slab")                      # before 6.10
    if (wants_cache or wants_user or wants_free) and slab_type is None and slab_bit is None:
        raise Unsupported("VMCOREINFO lacks NUMBER(PG_slab) and NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)")
    buddy_type = _type_value(info, "PAGE_BUDDY_MAPCOUNT_VALUE")
    if wants_free and buddy_type is None:
        # makedumpfile would walk the zones' free lists instead; not done here.
        raise Unsupported("VMCOREINFO lacks NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)")
    needs_mapping = wants_cache or wants_user
    if needs_mapping:
        compound = compound_layout(info)
    else:
        # Not needed for buddy pages, but a hwpoison or offline compound head
        # still takes its whole compound page with it, as in makedumpfile.
        try:
            compound = compound_layout(info)
        except Unsupported:
            compound = None
    head_mask = vi.number(info, "PG_head_mask", required=needs_mapping)
    if head_mask is not None:
        head_mask &= (1 << 64) - 1  # printed with %ld
    free_area_orders = vi.length(info, "zone.free_area")
    if free_area_orders is not None and not 1 <= free_area_orders <= ORDER_CAP:
        raise BadSource(f"VMCOREINFO LENGTH(zone.free_area)={free_area_orders} is not a number "
                        f"of page orders (1-{ORDER_CAP})")
    return PageRules(
        dump_level=dump_level,
        struct_page_size=vi.size(info, "page", required=True),
        flags_offset=vi.offset(info, "page.flags", required=True),
        mapping_offset=vi.offset(info, "page.mapping", required=needs_mapping) or 0,
        mapcount_offset=vi.offset(info, "page._mapcount", required=True),
        private_offset=vi.offset(info, "page.private", required=wants_free) or 0,
        compound_head_offset=_first_offset(info, "page.compound_head", "page.compound_info"),
        head_mask=head_mask or 0,
        lru_bit=_page_flag(info, "PG_lru", required=wants_cache),
        private_bit=_page_flag(info, "PG_private", required=wants_cache),
        swapcache_bit=_page_flag(info, "PG_swapcache", required=wants_cache),
        swapbacked_bit=_page_flag(info, "PG_swapbacked"),  # before 4.10 swap cache had no PG_swapbacked
        hwpoison_bit=_page_flag(info, "PG_hwpoison"),      # only with CONFIG_MEMORY_FAILURE
        slab_bit=slab_bit if slab_type is None else None,
        slab_type=slab_type,
        buddy_type=buddy_type,
        offline_type=_type_value(info, "PAGE_OFFLINE_MAPCOUNT_VALUE"),
        unaccepted_type=_type_value(info, "PAGE_UNACCEPTED_MAPCOUNT_VALUE"),
        free_area_orders=free_area_orders,
        compound=compound if head_mask else None,
    )


def walks_mem_map(info: vi.VmcoreInfo, dump_level: DumpLevel) -> bool:
    """Whether makedumpfile walks struct pages at this level: any of 2/4/8/16, or PG_hwpoison known."""
    return dump_level.needs_kernel or _page_flag(info, "PG_hwpoison") is not None


# --- decoding struct pages ----------------------------------------------------------------


def struct_page_dtype(rules: PageRules, byte_order: str = "little") -> np.dtype:
    """A numpy view of struct page with the fields the rules read (fields may overlap).

    byte_order is the crashed kernel's (big on s390x).
    """
    e = struct_prefix(byte_order)
    fields = {
        "flags": (rules.flags_offset, e + "u8"),
        "mapping": (rules.mapping_offset, e + "u8"),
        "mapcount": (rules.mapcount_offset, e + "u4"),
        "private": (rules.private_offset, e + "u8"),
        "compound_head": (rules.compound_head_offset, e + "u8"),
    }
    compound = rules.compound
    if compound is not None:
        fields["tail_order"] = (compound.order_offset, f"{e}u{compound.order_bytes}")
        if compound.dtor_offset is not None:
            fields["tail_dtor"] = (compound.dtor_offset, f"{e}u{compound.dtor_bytes}")
    for name, (at, fmt) in fields.items():
        if at < 0 or at + np.dtype(fmt).itemsize > rules.struct_page_size:
            raise BadSource(f"struct page field {name} at offset {at} is outside SIZE(page)="
                            f"{rules.struct_page_size}")
    return np.dtype({
        "names": list(fields),
        "formats": [fmt for _, fmt in fields.values()],
        "offsets": [at for at, _ in fields.values()],
        "itemsize": rules.struct_page_size,
    })


def _bit(values: np.ndarray, bit: int | None) -> np.ndarray:
    if bit is None:
        return np.zeros(values.shape, dtype=bool)
    return (values & np.uint64(1 << bit)) != 0


@dataclass(frozen=True)
class Claims:
    """Per struct page: the class makedumpfile would give it (KEPT..OFFLINE) and log2 of the pfns it excludes."""

    page_class: np.ndarray  # uint8
    order: np.ndarray       # int64, 0 for single pages


def page_claims(pages: np.ndarray, first_pfn: int, rules: PageRules,
                visit: np.ndarray | None = None) -> Claims:
    """Classify struct pages pages[i] = struct page of pfn first_pfn + i, each on its own.

    visit: pages makedumpfile looks at (its is_in_segs); others are KEPT here
    but can still fall inside an excluded range (see accept_claims). A head
    page's order is in the next struct page, so the last page of pages gets
    order 0: end pages on a 512-pfn boundary, where makedumpfile does the same.
    """
    count = len(pages)
    # Each field once into an array of its own: a field of the struct page array
    # is a strided view, and every operation on it walks the whole struct pages.
    flags = np.ascontiguousarray(pages["flags"])
    mapcount = np.ascontiguousarray(pages["mapcount"])
    looked_at = (pages["compound_head"] & np.uint64(TAIL_PAGE_MARK)) == 0
    if visit is not None:
        looked_at &= visit

    if rules.slab_type is not None:
        slab = mapcount == np.uint32(rules.slab_type)
    else:
        slab = _bit(flags, rules.slab_bit)

    order = np.zeros(count, dtype=np.int64)
    hugetlb = np.zeros(count, dtype=bool)
    compound = rules.compound
    if compound is not None:
        # The order is in the next struct page, which makedumpfile has only
        # within the same 512-page batch.
        head = (flags & np.uint64(rules.head_mask)) != 0
        head[(PGMM_CACHED - 1 - first_pfn) % PGMM_CACHED::PGMM_CACHED] = False  # a batch's last page
        heads = np.flatnonzero(head[:-1])
        tails = pages[heads + 1]
        order[heads] = tails["tail_order"].astype(np.int64)
        if compound.hugetlb_head_type is not None:
            hugetlb[heads] = mapcount[heads] == np.uint32(compound.hugetlb_head_type)
        elif compound.hugetlb_tail_flag_bit is not None:
            hugetlb[heads] = _bit(tails["flags"], compound.hugetlb_tail_flag_bit)
        elif compound.hugetlb_dtor is not None:
            hugetlb[heads] = tails["tail_dtor"].astype(np.int64) == compound.hugetlb_dtor
        # An order that is absurd or that the head's pfn is not aligned to is
        # garbage (makedumpfile: "Invalid order"); the destructor still counts.
        head_order = order[heads]
        bad = (head_order >= 64) | (((heads + first_pfn) & ((np.int64(1) << np.minimum(head_order, 62)) - 1)) != 0)
        order[heads[bad]] = 0

    page_class = np.zeros(count, dtype=np.uint8)
    undecided = looked_at.copy()

    def claim(selected: np.ndarray, page_class_value: int) -> None:
        page_class[selected] = page_class_value
        undecided[selected] = False

    level = rules.dump_level
    if level & DumpLevel.FREE:
        buddy = undecided & (mapcount == np.uint32(rules.buddy_type)) & ~slab
        free_order = pages["private"]
        if rules.free_area_orders is not None:
            # makedumpfile warns "Invalid free page order" and keeps the page.
            undecided[buddy & (free_order >= np.uint64(rules.free_area_orders))] = False
            buddy &= free_order < np.uint64(rules.free_area_orders)
        order[buddy] = np.minimum(free_order[buddy], np.uint64(ORDER_CAP)).astype(np.int64)
        claim(buddy, FREE)
        if rules.unaccepted_type is not None and rules.free_area_orders is not None:
            # Unaccepted memory is listed only in MAX_PAGE_ORDER blocks.
            unaccepted = undecided & (mapcount == np.uint32(rules.unaccepted_type))
            order[unaccepted] = rules.free_area_orders - 1
            claim(unaccepted, FREE)

    if level & (DumpLevel.CACHE | DumpLevel.CACHE_PRIVATE | DumpLevel.USER):
        anonymous = ((pages["mapping"] & np.uint64(PAGE_MAPPING_ANON)) != 0) & ~slab
    if level & (DumpLevel.CACHE | DumpLevel.CACHE_PRIVATE):
        swapcache = _bit(flags, rules.swapcache_bit)
        if rules.swapbacked_bit is not None:
            # PG_swapcache shares its bit with PG_owner_priv_1 unless swap-backed.
            swapcache &= _bit(flags, rules.swapbacked_bit)
        cache = (_bit(flags, rules.lru_bit) | swapcache) & ~anonymous
        private = _bit(flags, rules.private_bit)
        if level & DumpLevel.CACHE:
            claim(undecided & cache & ~private, CACHE)
        if level & DumpLevel.CACHE_PRIVATE:
            claim(undecided & cache & private, CACHE_PRIVATE)
            claim(undecided & cache, CACHE)
    if level & DumpLevel.USER:
        claim(undecided & (anonymous | hugetlb), USER)
    claim(undecided & _bit(flags, rules.hwpoison_bit), HWPOISON)
    if rules.offline_type is not None:
        claim(undecided & (mapcount == np.uint32(rules.offline_type)) & ~slab, OFFLINE)

    order[page_class == KEPT] = 0
    return Claims(page_class, order)


def accept_claims(starts: np.ndarray, spans: np.ndarray, walked_to: int) -> np.ndarray:
    """Which claims makedumpfile's walk reaches, given it already walked to pfn walked_to.

    Claim i excludes [starts[i], starts[i] + spans[i]); starts ascend. After
    excluding a range the walk continues at its end, so a claim that starts
    inside an accepted range is never made. Buddy blocks and compound pages
    are aligned to their size, so ranges nest and "inside any earlier range"
    is the same as "inside an accepted one"; that is checked, and a dump
    whose ranges do not nest is walked one claim at a time.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=bool)
    ends = starts + spans
    reach = np.maximum.accumulate(np.concatenate(([walked_to], ends[:-1])))
    accepted = starts >= reach
    accepted_reach = np.maximum.accumulate(np.concatenate(([walked_to], np.where(accepted, ends, 0)[:-1])))
    if np.array_equal(reach, accepted_reach):
        return accepted
    accepted = np.zeros(len(starts), dtype=bool)
    position = walked_to
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        if start >= position:
            accepted[i] = True
            position = end
    return accepted


# --- where the struct pages are: SPARSEMEM mem_section --------------------------------------


@dataclass(frozen=True)
class MemMapRun:
    """pfns [start_pfn, end_pfn) whose struct pages are contiguous from kernel vaddr mem_map."""

    start_pfn: int
    end_pfn: int
    mem_map: int

    def struct_page_vaddr(self, pfn: int, struct_page_size: int) -> int:
        return self.mem_map + (pfn - self.start_pfn) * struct_page_size


@dataclass(frozen=True)
class SparseMemLayout:
    """The mem_section tree as VMCOREINFO describes it (include/linux/mmzone.h)."""

    root_vaddr: int              # SYMBOL(mem_section): the root array (4.15+: its pointer's value)
    extreme: bool                # SPARSEMEM_EXTREME: roots are pointers to pages of sections
    mem_section_size: int
    section_mem_map_offset: int
    pages_per_section: int
    sections_per_root: int
    nr_mem_sections: int
    struct_page_size: int


def sparsemem_layout(info: vi.VmcoreInfo, physmem_bits_candidates: tuple[int, ...] = ()) -> SparseMemLayout:
    """Read the SPARSEMEM description from VMCOREINFO (makedumpfile get_mem_type).

    Kernels before NUMBER(MAX_PHYSMEM_BITS) (5.x): x86_64's default, or, given
    the architecture's candidates (ppc64, s390x), the first that makes
    LENGTH(mem_section) the number of section roots, as makedumpfile's
    set_ppc64_max_physmem_bits and set_s390x_max_physmem_bits choose.
    """
    if vi.symbol(info, "mem_section") is None and vi.symbol(info, "mem_map") is not None:
        raise Unsupported("FLATMEM (SYMBOL(mem_map) without SYMBOL(mem_section)) is not supported")
    page_size = vi.page_size(info, required=True)
    page_shift = page_size.bit_length() - 1
    section_size_bits = vi.number(info, "SECTION_SIZE_BITS", required=True)
    max_physmem_bits = vi.number(info, "MAX_PHYSMEM_BITS")
    if max_physmem_bits is None and physmem_bits_candidates:
        max_physmem_bits = _physmem_bits_by_roots(info, physmem_bits_candidates, page_size, section_size_bits)
    if max_physmem_bits is None:  # before 5.x; x86_64's defaults
        max_physmem_bits = X86_64_DEFAULT_MAX_PHYSMEM_BITS[bool(vi.number(info, "pgtable_l5_enabled"))]
    elif not page_shift < max_physmem_bits <= 64:
        raise BadSource(f"VMCOREINFO NUMBER(MAX_PHYSMEM_BITS)={max_physmem_bits} is not a physical "
                        f"address size (PAGESIZE={page_size}: {page_shift + 1} to 64 bits)")
    if not page_shift <= section_size_bits <= max_physmem_bits:
        raise BadSource(f"VMCOREINFO NUMBER(SECTION_SIZE_BITS)={section_size_bits} is not a section size "
                        f"(PAGESIZE={page_size}, MAX_PHYSMEM_BITS={max_physmem_bits}: "
                        f"{page_shift} to {max_physmem_bits} bits)")
    mem_section_size = vi.size(info, "mem_section", required=True)
    section_mem_map_offset = vi.offset(info, "mem_section.section_mem_map", required=True)
    if not section_mem_map_offset + POINTER_BYTES <= mem_section_size <= page_size:
        raise BadSource(f"VMCOREINFO SIZE(mem_section)={mem_section_size} does not hold "
                        f"OFFSET(mem_section.section_mem_map)={section_mem_map_offset} "
                        f"or exceeds PAGESIZE={page_size}")
    struct_page_size = vi.size(info, "page", required=True)
    if not POINTER_BYTES <= struct_page_size <= MAX_STRUCT_PAGE_BYTES:
        raise BadSource(f"VMCOREINFO SIZE(page)={struct_page_size} is not the size of a struct page "
                        f"({POINTER_BYTES} to {MAX_STRUCT_PAGE_BYTES} bytes)")
    nr_mem_sections = 1 << (max_physmem_bits - section_size_bits)
    per_root_extreme = page_size // mem_section_size
    roots = vi.length(info, "mem_section")
    extreme = roots is None or roots == -(-nr_mem_sections // per_root_extreme)
    return SparseMemLayout(
        root_vaddr=vi.symbol(info, "mem_section", required=True),
        extreme=extreme,
        mem_section_size=mem_section_size,
        section_mem_map_offset=section_mem_map_offset,
        pages_per_section=1 << (section_size_bits - page_shift),
        sections_per_root=per_root_extreme if extreme else 1,
        nr_mem_sections=nr_mem_sections,
        struct_page_size=struct_page_size,
    )


def _physmem_bits_by_roots(info: vi.VmcoreInfo, candidates: tuple[int, ...], page_size: int,
                           section_size_bits: int) -> int:
    roots = vi.length(info, "mem_section")
    mem_section_size = vi.size(info, "mem_section", required=True)
    for bits in candidates:
        sections = 1 << max(bits - section_size_bits, 0)
        if roots in (sections // max(page_size // mem_section_size, 1), sections):
            return bits
    raise Unsupported(f"VMCOREINFO lacks NUMBER(MAX_PHYSMEM_BITS), and LENGTH(mem_section)={roots} "
                      f"fits none of this architecture's sizes {', '.join(map(str, candidates))}")


def _section_mem_maps(read_virtual: ReadVirtual, layout: SparseMemLayout, root_vaddr: int,
                      sections: int, byte_order: str = "little",
                      kernel_start: int = KERNEL_HALF) -> list[int | None] | None:
    """Each section's mem_map (already decoded to the section's first pfn), None if absent.

    Returns None when the tree at root_vaddr does not validate (no present
    section, or a mem_map that is not a kernel address), as makedumpfile's
    validate_mem_section does.
    """
    per_root = layout.sections_per_root
    roots = -(-sections // per_root)
    try:
        if layout.extreme:
            raw_roots = read_virtual(root_vaddr, roots * POINTER_BYTES)
            root_addrs = np.frombuffer(raw_roots, dtype=struct_prefix(byte_order) + "u8").tolist()
        else:
            root_addrs = [root_vaddr + i * layout.mem_section_size for i in range(roots)]
        mem_maps: list[int | None] = []
        for root_index, root_addr in enumerate(root_addrs):
            in_root = min(per_root, sections - root_index * per_root)
            if root_addr == 0:
                mem_maps.extend([None] * in_root)
                continue
            if root_addr < kernel_start:
                return None
            raw = read_virtual(root_addr, in_root * layout.mem_section_size)
            for i in range(in_root):
                at = i * layout.mem_section_size + layout.section_mem_map_offset
                coded = int.from_bytes(raw[at:at + POINTER_BYTES], byte_order)
                if not coded & SECTION_MARKED_PRESENT:
                    mem_maps.append(None)
                    continue
                # The kernel stores mem_map minus the section's first pfn
                # (sparse_encode_mem_map) so that mem_map + pfn works.
                section_nr = root_index * per_root + i
                mem_map = ((coded & SECTION_MAP_MASK)
                           + section_nr * layout.pages_per_section * layout.struct_page_size) \
                    & 0xFFFF_FFFF_FFFF_FFFF
                if mem_map < kernel_start:
                    return None
                mem_maps.append(mem_map)
    except (BadSource, SourceIOError):
        return None
    return mem_maps if any(m is not None for m in mem_maps) else None


def mem_map_runs(read_virtual: ReadVirtual, info: vi.VmcoreInfo, max_pfn: int, *, byte_order: str = "little",
                 kernel_start: int = KERNEL_HALF,
                 physmem_bits_candidates: tuple[int, ...] = ()) -> tuple[MemMapRun, ...]:
    """The struct pages of pfns below max_pfn, as runs of contiguous mem_map (makedumpfile get_mm_sparsemem).

    byte_order and kernel_start (the lowest kernel address: a section root or
    mem_map below it is not valid) are the translator's: on s390x the kernel
    is big-endian and its addresses start at 0.

    SYMBOL(mem_section) is the root array's address from VMCOREINFO; if that
    does not validate, it is read as a pointer to the root array (the
    4.15-era VMCOREINFO that printed the pointer variable's address).
    """
    layout = sparsemem_layout(info, physmem_bits_candidates)
    sections = min(-(-max_pfn // layout.pages_per_section), layout.nr_mem_sections)
    if sections <= 0:
        return ()
    if sections > MAX_MEM_SECTIONS:
        raise Unsupported(f"memory up to pfn {max_pfn:#x} spans {sections} mem_sections of "
                          f"{layout.pages_per_section} pages; vmcap walks at most {MAX_MEM_SECTIONS}")
    mem_maps = _section_mem_maps(read_virtual, layout, layout.root_vaddr, sections, byte_order, kernel_start)
    if mem_maps is None and layout.extreme:
        try:
            pointer = int.from_bytes(read_virtual(layout.root_vaddr, POINTER_BYTES), byte_order)
        except (BadSource, SourceIOError):
            pointer = 0
        if pointer >= max(kernel_start, 1):
            mem_maps = _section_mem_maps(read_virtual, layout, pointer, sections, byte_order, kernel_start)
    if mem_maps is None:
        raise BadSource(f"mem_section tree at SYMBOL(mem_section)={layout.root_vaddr:#x} "
                        "has no valid section (nor as a pointer to one)")
    runs: list[MemMapRun] = []
    for section_nr, mem_map in enumerate(mem_maps):
        if mem_map is None:
            continue
        start = section_nr * layout.pages_per_section
        end = min(start + layout.pages_per_section, max_pfn)
        last = runs[-1] if runs else None
        if last and last.end_pfn == start and last.struct_page_vaddr(start, layout.struct_page_size) == mem_map:
            runs[-1] = MemMapRun(last.start_pfn, end, last.mem_map)
        else:
            runs.append(MemMapRun(start, end, mem_map))
    return tuple(runs)


# --- the walk --------------------------------------------------------------------------------


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(octets: np.ndarray) -> np.ndarray:
    """Set bits per byte (numpy 2's bitwise_count, or a table before it)."""
    count = getattr(np, "bitwise_count", None)
    return count(octets) if count is not None else _POPCOUNT[octets]


class PfnBitmap:
    """One bit per pfn, packed (little bit order, like kdump bitmaps).

    A 512 GiB machine has 128 Mi pfns: 16 MiB as bits, 128 MiB as a bool
    array, which the capture kernel does not have. Slices unpack only the
    part asked for and come back as bool arrays.
    """

    def __init__(self, size: int):
        self.size = size
        self.bits = np.zeros((size + 7) // 8, dtype=np.uint8)

    def __len__(self) -> int:
        return self.size

    def set_ranges(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Set the bits of pfns [starts[i], ends[i]) (disjoint, ascending) in one pass over
        their span: +1 where a range starts, -1 where it ends, a running sum, packed."""
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            return
        lo = int(starts[0]) & ~7
        hi = int(ends[-1])
        edges = np.zeros(hi - lo + 1, dtype=np.int8)
        edges[starts - lo] = 1
        edges[ends - lo] -= 1  # where one range ends and the next starts: 0
        inside = np.cumsum(edges[:-1], dtype=np.int8) > 0
        packed = np.packbits(inside, bitorder="little")
        self.bits[lo >> 3:(lo >> 3) + len(packed)] |= packed

    def set_range(self, start: int, end: int) -> None:
        """Set the bits of pfns [start, end) without listing them (a gigantic page, a spill)."""
        if end <= start:
            return
        first_byte, last_byte = start >> 3, (end - 1) >> 3
        low = (0xFF << (start & 7)) & 0xFF
        high = 0xFF >> (7 - ((end - 1) & 7))
        if first_byte == last_byte:
            self.bits[first_byte] |= low & high
            return
        self.bits[first_byte] |= low
        self.bits[first_byte + 1:last_byte] = 0xFF
        self.bits[last_byte] |= high

    def first_clear(self, start: int, stop: int) -> int:
        """The first pfn in [start, stop) whose bit is clear, or stop; scans packed bytes."""
        stop = min(stop, self.size)
        bits = self.bits
        at = start
        while at < stop and at & 7:  # the bits before the first whole byte
            if not int(bits[at >> 3]) >> (at & 7) & 1:
                return at
            at += 1
        piece = 64
        while at < stop:
            lo = at >> 3
            hi = min((stop + 7) >> 3, lo + piece)
            open_bytes = np.flatnonzero(bits[lo:hi] != 0xFF)
            if len(open_bytes):
                index = lo + int(open_bytes[0])
                octet = int(bits[index])
                # The lowest clear bit of the byte: bits past stop may be set or not.
                return min(index * 8 + (~octet & (octet + 1)).bit_length() - 1, stop)
            at, piece = hi * 8, min(piece * 8, 1 << 20)
        return stop

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("PfnBitmap slices take no step")
            if stop <= start:
                return np.zeros(0, dtype=bool)
            packed = self.bits[start >> 3:(stop + 7) >> 3]
            unpacked = np.unpackbits(packed, bitorder="little")
            return unpacked[start & 7:(start & 7) + stop - start].astype(bool)
        pfn = int(key)
        if not 0 <= pfn < self.size:
            raise IndexError(pfn)
        return bool(self.bits[pfn >> 3] >> (pfn & 7) & 1)

    def count(self) -> int:
        """Set bits, counted in bounded pieces."""
        step = 1 << 24
        return sum(int(_popcount(self.bits[i:i + step]).sum(dtype=np.int64))
                   for i in range(0, len(self.bits), step))

    def to_array(self) -> np.ndarray:
        """The whole bitmap as bools (tests and small dumps only)."""
        return self[0:self.size]


# makedumpfile's cyclic mode: the excluded pfns are known one cycle of pfns at a
# time. 2**25 pfns (128 GiB of 4 KiB pages) is a 4 MiB bitmap, whatever the RAM size.
CYCLE_PFNS = 1 << 25


class CyclicExclusion:
    """excluded[pfn] for pfns [0, max_pfn), from bounded state: one cycle's bitmap at a time.

    The classification walk runs once in full to count (count() needs no
    bitmap) and to record, at each cycle's first pfn, how far the walk had
    got (walked_to): that is the whole state one cycle's walk needs to
    decide exactly what the full walk decides. A slice is answered from the
    cycles it touches, each rebuilt by walking only its own struct pages
    when it is not the cached one; cycles the walk never excluded anything in
    are answered with zeros and not walked. Consumers reading in ascending
    pfn order rebuild each cycle once: struct pages are read twice in all,
    as makedumpfile's cyclic mode reads them.

    Answers to slices ([lo:hi] -> bool array), single pfns, len() and
    count(), like PfnBitmap; memory is one cycle (CYCLE_PFNS / 8 bytes) plus
    a few ints per cycle, not 1 bit per pfn of the address space.
    """

    def __init__(self, walk_cycle: Callable[[int, int, int, PfnBitmap], None], max_pfn: int,
                 cycle_pfns: int, walked_to_at: Sequence[int], touched: Sequence[bool], total: int,
                 cached: tuple[int, PfnBitmap] | None = None):
        self._walk_cycle = walk_cycle
        self.size = max_pfn
        self.cycle_pfns = cycle_pfns
        self._walked_to_at = list(walked_to_at)
        self._touched = list(touched)
        self._total = total
        self._cached = cached
        self.cycles_walked = 0  # cycles rebuilt after the counting walk (tests, profiling)

    def __len__(self) -> int:
        return self.size

    def count(self) -> int:
        return self._total

    def _cycle_bits(self, index: int) -> PfnBitmap | None:
        """Bits of pfns [index * cycle_pfns, ...) in the cycle's own bitmap, None if all clear."""
        if not self._touched[index]:
            return None
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        first = index * self.cycle_pfns
        end = min(first + self.cycle_pfns, self.size)
        bits = PfnBitmap(end - first)
        self._walk_cycle(first, end, self._walked_to_at[index], bits)
        self.cycles_walked += 1
        self._cached = (index, bits)
        return bits

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("CyclicExclusion slices take no step")
            if stop <= start:
                return np.zeros(0, dtype=bool)
            pieces = [np.zeros(end - at, dtype=bool) if bits is None else bits[at - first:end - first]
                      for at, first, end, bits in self._cycle_pieces(start, stop)]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        pfn = int(key)
        if not 0 <= pfn < self.size:
            raise IndexError(pfn)
        return bool(self[pfn:pfn + 1][0])

    def first_clear(self, start: int, stop: int) -> int:
        """The first pfn in [start, stop) not excluded, or stop, from the cycles' packed bits."""
        stop = min(stop, self.size)
        for at, first, end, bits in self._cycle_pieces(start, stop):
            if bits is None:
                return at  # a cycle the walk excluded nothing in
            found = first + bits.first_clear(at - first, end - first)
            if found < end:
                return found
        return stop

    def _cycle_pieces(self, start: int, stop: int):
        """(at, cycle's first pfn, end, its bits or None) of each cycle [start, stop) touches, in order."""
        at = start
        while at < stop:
            index = at // self.cycle_pfns
            first = index * self.cycle_pfns
            end = min(first + self.cycle_pfns, stop)
            yield at, first, end, self._cycle_bits(index)
            at = end

    def to_array(self) -> np.ndarray:
        """The whole bitmap as bools (tests and small dumps only)."""
        return self[0:self.size]


@dataclass(frozen=True)
class ExclusionResult:
    """Pages a dump level leaves out.

    excluded[pfn] is True for pages not to dump because of dump level bits
    2/4/8/16, and for hwpoison and offline pages, which makedumpfile leaves
    out at every level whenever it walks struct pages (reading a poisoned
    page can machine-check the capture kernel). Zero pages (bit 1) are not
    decided here. excluded answers slices [lo:hi] (bool arrays) and count()
    from one cycle of state at a time (CyclicExclusion): read it in ascending
    pfn order, in pieces, never whole. counts: its ``classes`` are the pfns
    excluded per class ("free", "cache", "cache_private", "user", "hwpoison",
    "offline"), its ``total_pages`` the pfns that have a struct page and are
    RAM in the dump (makedumpfile's "Original pages"). dump_level is the level
    classified for.
    """

    max_pfn: int
    excluded: CyclicExclusion  # max_pfn pfns, sliced [lo:hi]
    counts: ExclusionCounts
    dump_level: DumpLevel


class RamPfnRanges:
    """[start, end) pfn ranges of RAM, found per chunk by binary search.

    A fragmented EFI memory map gives 100,000 segments; testing each of them
    for each chunk of a large machine would take hours.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        ordered = sorted(ranges)
        self.starts = [start for start, _ in ordered]
        self.ends = [end for _, end in ordered]
        # The furthest end so far: ascending even where ranges nest or overlap.
        self.reach = np.maximum.accumulate(np.array(self.ends, dtype=np.int64)).tolist() \
            if ordered else []

    def visit_mask(self, first_pfn: int, count: int) -> np.ndarray:
        visit = np.zeros(count, dtype=bool)
        end_pfn = first_pfn + count
        lo = bisect_right(self.reach, first_pfn)
        hi = bisect_left(self.starts, end_pfn)
        for start, end in zip(self.starts[lo:hi], self.ends[lo:hi]):
            lo_index, hi_index = max(start, first_pfn) - first_pfn, min(end, end_pfn) - first_pfn
            if lo_index < hi_index:
                visit[lo_index:hi_index] = True
        return visit


def _chunks(start_pfn: int, end_pfn: int, chunk_pages: int):
    """[first, end) pieces of [start_pfn, end_pfn) that end on multiples of chunk_pages."""
    first = start_pfn
    while first < end_pfn:
        end = min((first // chunk_pages + 1) * chunk_pages, end_pfn)
        yield first, end
        first = end


def _set_ranges(bits: PfnBitmap, offset: int, starts: np.ndarray, ends: np.ndarray, long_span: int) -> None:
    """Set pfns [starts[i], ends[i]) (disjoint, ascending) in bits, whose bit 0 is pfn offset.

    Short ranges are set in one pass over their span; the few long ones (a
    gigantic page, a damaged order) as byte ranges, so no array grows with a
    range's length.
    """
    long = ends - starts > long_span
    if long.any():
        for start, end in zip(starts[long].tolist(), ends[long].tolist()):
            bits.set_range(start - offset, end - offset)
        starts, ends = starts[~long], ends[~long]
    if len(starts):
        bits.set_ranges(starts - offset, ends - offset)


class _Walk:
    """makedumpfile's pfn-order walk over struct pages, restartable at any cycle boundary."""

    def __init__(self, read_virtual: ReadVirtual, runs: Sequence[MemMapRun], rules: PageRules,
                 max_pfn: int, chunk_pages: int, ram: RamPfnRanges | None, byte_order: str = "little",
                 map_virtual: MapVirtual | None = None):
        self.read_virtual = read_virtual
        self.map_virtual = map_virtual
        self.runs = sorted(runs, key=lambda r: r.start_pfn)
        self.rules = rules
        self.max_pfn = max_pfn
        self.chunk_pages = chunk_pages
        self.ram = ram
        self.dtype = struct_page_dtype(rules, byte_order)

    def runs_overlap(self) -> bool:
        return any(a.end_pfn > b.start_pfn for a, b in zip(self.runs, self.runs[1:]))

    def chunks(self, lo_pfn: int, hi_pfn: int):
        """The walk's chunks whose pfns are in [lo_pfn, hi_pfn), in walk order.

        With lo_pfn and hi_pfn multiples of chunk_pages and runs that do not
        overlap, these are exactly the full walk's chunks in that range.
        """
        for run in self.runs:
            first, end = max(run.start_pfn, lo_pfn), min(run.end_pfn, self.max_pfn, hi_pfn)
            if first < end:
                for piece in _chunks(first, end, self.chunk_pages):
                    yield run, piece

    def accepted(self, run: MemMapRun, first_pfn: int, end_pfn: int, walked_to: int):
        """(looked_at, starts, ends, page_class) of one chunk's accepted claims, ends cut at max_pfn."""
        rules = self.rules
        count = end_pfn - first_pfn
        visit = None if self.ram is None else self.ram.visit_mask(first_pfn, count)
        if visit is not None and not visit.any():
            return 0, None, None, None
        vaddr = run.struct_page_vaddr(first_pfn, rules.struct_page_size)
        size = count * rules.struct_page_size
        struct_pages = None if self.map_virtual is None else self.map_virtual(vaddr, size)
        if struct_pages is None:
            try:
                struct_pages = nullcontext(self.read_virtual(vaddr, size))
            except BadSource as error:
                raise BadSource(f"struct pages of pfns {first_pfn:#x}-{end_pfn:#x} at vaddr {vaddr:#x}: "
                                f"{error}") from error
        with struct_pages as raw:  # the claims are arrays of their own: nothing keeps a mapping
            claims = page_claims(np.frombuffer(raw, dtype=self.dtype, count=count), first_pfn, rules, visit)
        looked_at = count if visit is None else int(np.count_nonzero(visit))
        index = np.flatnonzero(claims.page_class)
        starts = index + first_pfn
        spans = np.int64(1) << np.minimum(claims.order[index], ORDER_CAP)
        accepted = accept_claims(starts, spans, walked_to)
        if not accepted.any():
            return looked_at, None, None, None
        starts = starts[accepted]
        ends = starts + spans[accepted]
        return looked_at, starts, ends, claims.page_class[index][accepted]

    def fill_cycle(self, lo_pfn: int, hi_pfn: int, walked_to: int, bits: PfnBitmap) -> None:
        """Set in bits (bit 0 = lo_pfn) what the full walk excludes in [lo_pfn, hi_pfn).

        walked_to is where the full walk stood at lo_pfn: pfns below it were
        excluded by a range that started in an earlier cycle.
        """
        bits.set_range(0, min(walked_to, hi_pfn) - lo_pfn)
        for run, (first_pfn, end_pfn) in self.chunks(lo_pfn, hi_pfn):
            _, starts, ends, _ = self.accepted(run, first_pfn, end_pfn, walked_to)
            if starts is None:
                continue
            walked_to = max(walked_to, int(ends.max()))
            _set_ranges(bits, lo_pfn, starts, np.minimum(ends, hi_pfn), self.chunk_pages)


def classify_mem_map(read_virtual: ReadVirtual, runs: Sequence[MemMapRun], rules: PageRules, *,
                     max_pfn: int, chunk_pages: int = 1 << 14,
                     ram_pfn_ranges: Sequence[tuple[int, int]] | None = None,
                     cycle_pfns: int = CYCLE_PFNS, byte_order: str = "little",
                     map_virtual: MapVirtual | None = None) -> ExclusionResult:
    """Walk the struct pages of runs in pfn order, chunk_pages at a time, and apply the rules.

    One read_virtual call per chunk (chunk_pages * SIZE(page) bytes); chunks
    are aligned to makedumpfile's 512-page batches so a head page's order is
    found where makedumpfile finds it. This walk counts; the excluded pfns
    themselves are rebuilt one cycle of cycle_pfns at a time when asked for
    (CyclicExclusion). With a single cycle its bitmap is kept from this walk.
    map_virtual(vaddr, size), if given, maps a chunk's struct pages instead of
    copying them (a context manager giving the bytes), or returns None.
    """
    chunk_pages = max(PGMM_CACHED, -(-chunk_pages // PGMM_CACHED) * PGMM_CACHED)
    walk = _Walk(read_virtual, runs, rules, max_pfn, chunk_pages,
                 None if ram_pfn_ranges is None else RamPfnRanges(ram_pfn_ranges), byte_order, map_virtual)
    # Cycles are whole chunks, so a cycle's walk meets the full walk's chunks.
    cycle_pfns = max(chunk_pages, -(-cycle_pfns // chunk_pages) * chunk_pages)
    if walk.runs_overlap():
        cycle_pfns = max(max_pfn, 1)  # walk order would differ per cycle: one cycle, as before
    cycles = max(1, -(-max_pfn // cycle_pfns))
    walked_to_at = [0] * cycles
    touched = [False] * cycles
    first_bits = PfnBitmap(min(cycle_pfns, max_pfn))  # cycle 0's, kept: readers start there
    class_pages = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    looked_at = 0
    walked_to = 0  # the walk resumes here: everything before it is decided
    cycle = 0
    for run, (first_pfn, end_pfn) in walk.chunks(0, max_pfn):
        while first_pfn >= (cycle + 1) * cycle_pfns:
            cycle += 1
            walked_to_at[cycle] = walked_to
            touched[cycle] = walked_to > cycle * cycle_pfns
        seen, starts, ends, page_class = walk.accepted(run, first_pfn, end_pfn, walked_to)
        looked_at += seen
        if starts is None:
            continue
        touched[cycle] = True
        walked_to = max(walked_to, int(ends.max()))
        # A range may run past this chunk, this run, this cycle or max_pfn.
        ends = np.minimum(ends, max_pfn)
        if cycle == 0:
            _set_ranges(first_bits, 0, starts, np.minimum(ends, cycle_pfns), chunk_pages)
        class_pages += np.bincount(page_class, weights=ends - starts,
                                   minlength=len(CLASS_NAMES)).astype(np.int64)
    while cycle + 1 < cycles:
        cycle += 1
        walked_to_at[cycle] = walked_to
        touched[cycle] = walked_to > cycle * cycle_pfns
    counts = ExclusionCounts(classes={name: int(class_pages[i]) for i, name in enumerate(CLASS_NAMES) if i != KEPT},
                             total_pages=looked_at)
    excluded = CyclicExclusion(walk.fill_cycle, max_pfn, cycle_pfns, walked_to_at, touched,
                               int(class_pages[1:].sum()), cached=(0, first_bits))
    return ExclusionResult(max_pfn=max_pfn, excluded=excluded, counts=counts, dump_level=rules.dump_level)


def no_exclusion(max_pfn: int) -> CyclicExclusion:
    """Nothing excluded, for any max_pfn, in no memory."""
    cycles = max(1, -(-max_pfn // CYCLE_PFNS))
    return CyclicExclusion(lambda *_: None, max_pfn, CYCLE_PFNS, [0] * cycles, [False] * cycles, 0)


def classify_pages(read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, machine: str, dump_level: DumpLevel | int, *,
                   max_pfn: int, chunk_pages: int = 1 << 14,
                   ram_pfn_ranges: Sequence[tuple[int, int]] | None = None,
                   map_physical: MapPhysical | None = None) -> ExclusionResult:
    """Pages that makedumpfile -d dump_level would leave out (bits 2/4/8/16; bit 1 is ignored).

    read_physical(paddr, size) reads the dump; struct pages are found through
    the kernel's page tables (vmemmap) and the mem_section tree. max_pfn
    bounds the walk and sizes the result. ram_pfn_ranges, [start, end) pfn
    pairs of the dump's RAM, limits which struct pages are looked at, as
    makedumpfile's is_in_segs does; None looks at every pfn with a struct page.
    map_physical(paddr, size) maps physical memory instead of reading it, or
    returns None (ElfMemory.mapped): struct pages are read that way where their
    chunk is physically contiguous.
    Raises Unsupported naming the missing VMCOREINFO key, or the architecture.
    """
    dump_level = DumpLevel.of(dump_level)
    if max_pfn > MAX_CLASSIFIED_PFNS:
        raise Unsupported(f"the dump's memory reaches pfn {max_pfn:#x}; vmcap classifies pages "
                          f"below pfn {MAX_CLASSIFIED_PFNS:#x} only")
    if not walks_mem_map(vmcoreinfo, dump_level):
        counts = ExclusionCounts(classes=dict.fromkeys(EXCLUDED_CLASSES, 0))
        return ExclusionResult(max_pfn, no_exclusion(max_pfn), counts, dump_level)
    rules = page_rules(vmcoreinfo, dump_level)
    translator = make_translator(read_physical, vmcoreinfo, machine)
    byte_order = getattr(translator, "byte_order", "little")
    runs = mem_map_runs(translator.read_virtual, vmcoreinfo, max_pfn, byte_order=byte_order,
                        kernel_start=getattr(translator, "kernel_start", KERNEL_HALF),
                        physmem_bits_candidates=getattr(translator, "physmem_bits_candidates", ()))
    map_virtual = None
    translate = getattr(translator, "translate", None)
    if map_physical is not None and translate is not None:
        def map_virtual(vaddr: int, size: int):
            try:
                paddr, contiguous = translate(vaddr)
            except BadSource:
                return None  # read_virtual says where, as it always did
            return map_physical(paddr, size) if contiguous >= size else None

    return classify_mem_map(translator.read_virtual, runs, rules, max_pfn=max_pfn,
                            chunk_pages=chunk_pages, ram_pfn_ranges=ram_pfn_ranges, byte_order=byte_order,
                            map_virtual=map_virtual)


# --- --mem-usage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemUsageRow:
    """One row of makedumpfile --mem-usage's table."""

    type: str
    pages: int
    excludable: bool
    description: str


def mem_usage(result: ExclusionResult) -> dict[str, MemUsageRow]:
    """The --mem-usage table (TYPE -> row) from a classification at a level with bits 2, 4, 8, 16.

    Zero pages cannot be told from struct pages, so there is no ZERO row and
    KERN_DATA (the rest of the pages looked at) includes them.
    """
    if not result.dump_level.includes(KERNEL_CLASSES):
        raise ValueError(f"mem_usage needs a classification at dump level 30 or 31, not {result.dump_level}")
    counts = result.counts.classes
    rows = [
        MemUsageRow("NON_PRI_CACHE", counts["cache"], True, "Cache pages without private flag"),
        MemUsageRow("PRI_CACHE", counts["cache_private"], True, "Cache pages with private flag"),
        MemUsageRow("USER", counts["user"], True, "User process pages"),
        MemUsageRow("FREE", counts["free"], True, "Free pages"),
        MemUsageRow("HWPOISON", counts["hwpoison"], True, "Hardware-poisoned pages (always excluded)"),
        MemUsageRow("OFFLINE", counts["offline"], True, "Logically offline pages (always excluded)"),
    ]
    kernel_data = result.counts.total_pages - sum(row.pages for row in rows)
    rows.append(MemUsageRow("KERN_DATA", kernel_data, False, "Dumpable kernel data (and zero pages)"))
    return {row.type: row for row in rows}
