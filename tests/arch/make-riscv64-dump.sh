#!/bin/bash
# make-riscv64-dump.sh: a real riscv64 kdump (/proc/vmcore copied by a capture kernel) and
# makedumpfile's outputs for it, for tests/test_arch_riscv64.py.
#
#   tests/arch/make-riscv64-dump.sh [NAME=riscv64-sv57] [EXTRA 1st-kernel cmdline words...]
#   e.g. tests/arch/make-riscv64-dump.sh riscv64-sv39 no4lvl
# Work directory: $RVOUT (default /var/tmp/vmcap-riscv64). Needs: qemu-system-misc (QEMU 7.2's
# qemu-system-riscv64 and its OpenSBI fw_dynamic), qemu-user-static, dpkg, apt-get, cpio, gzip,
# xz, zstd, python3 with numpy, and for makedumpfile's upstream build (MDF_SRC, step 4) gcc, make,
# git and libelf/libdw/zlib/libbz2/liblzo2/libzstd -dev. Nothing is installed into the host: the riscv64 .debs are fetched with a private
# apt configuration (Debian trixie; sid for kexec-tools, which trixie does not build for riscv64,
# and makedumpfile 1.7.8) and unpacked with dpkg -x.
#
# What happens:
#  1. Guest: QEMU `-M virt -cpu rv64 -smp 1 -m 256`, OpenSBI, Debian's 6.12 riscv64 kernel (its
#     Image, never installed), cmdline `console=ttyS0 crashkernel=96M init_on_free=1 panic=-1`.
#     init_on_free=1 zeroes freed pages (the unpacked initramfs), so the dump compresses well.
#  2. The 1st kernel's /init (riscv64-init.sh) runs `kexec -p` (kexec_load: kexec-tools builds the
#     ELF headers; Debian's kernel has no KEXEC_FILE) with the same Image, read from a read-only
#     virtio disk (in the initramfs, the Image and kexec's copy do not fit), and a small capture
#     initramfs, logs the marker line, then panics with sysrq-c. kexec-tools 2.0.32 leaves the
#     "Reserved" memblock ranges out of the dump (mem_section, struct pages, page tables), so /init
#     bind-mounts a copy of /proc/iomem without them first (see riscv64-init.sh; the cmdline word
#     lab_iomem=kexec-tools keeps kexec-tools' own choice, to reproduce that).
#  3. The capture kernel's /init copies /proc/vmcore with dd to the raw virtio disk with serial
#     "vmcore" and writes its size and md5sum to the disk with serial "info", then powers off.
#  4. The host cuts the vmcore out of the disk image, checks its md5, and runs makedumpfile (see
#     step 4 below for which one and why):
#       --dump-dmesg -> NAME.makedumpfile-dmesg.txt
#       -d 31        -> NAME.makedumpfile-d31-pfns.txt (riscv64_kept_pfns.py: the pfn runs its
#                       kdump output stores with data, and those stored as the zero page)
#       -d 2/4/8/16  -> NAME.makedumpfile-levels-pfns.txt (the pfn runs in each one's bitmap)
#     and compresses the vmcore into NAME.vmcore.zst (zstd -19 --long).
# Outputs in $RVOUT/NAME/. Copy NAME.vmcore.zst, NAME.makedumpfile-*.txt and NAME.info.txt into
# tests/data/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-riscv64-sv57}; shift || true
EXTRA="$*"
RVOUT=${RVOUT:-/var/tmp/vmcap-riscv64}; MEM=${MEM:-256}; CRASHKERNEL=${CRASHKERNEL:-96M}
KPKG=linux-image-6.12.117+deb13-riscv64
W=$RVOUT/$NAME; A=$RVOUT/apt; D=$RVOUT/debs; R=$RVOUT/root; K=$RVOUT/kernel
mkdir -p "$RVOUT"

# --- 1. riscv64 packages (private apt state; the host's apt configuration is untouched) ---
if [[ ! -s $D/.done ]]; then
  mkdir -p "$A"/{lists/partial,cache/archives/partial,etc/preferences.d} "$D"; : > "$A/status"
  cat > "$A/etc/sources.list" <<SRC
deb [arch=riscv64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [arch=riscv64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
SRC
  cat > "$A/apt.conf" <<CONF
Dir::Etc::SourceList "$A/etc/sources.list"; Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "$A/etc/preferences"; Dir::Etc::PreferencesParts "$A/etc/preferences.d";
Dir::State "$A"; Dir::State::Lists "$A/lists"; Dir::State::status "$A/status"; Dir::Cache "$A/cache";
APT::Architecture "riscv64"; APT::Architectures { "riscv64"; };
CONF
  export APT_CONFIG=$A/apt.conf
  apt-get update -qq
  (cd "$D" && apt-get download -qq "$KPKG" busybox-static/trixie kexec-tools makedumpfile=1:1.7.8-1 \
     libc6/trixie libdw1t64/trixie libelf1t64/trixie liblzo2-2/trixie libzstd1/trixie zlib1g/trixie \
     liblzma5/trixie libbz2-1.0/trixie)
  unset APT_CONFIG
  ls "$D"/*.deb > "$D/.done"
fi
if [[ ! -x $R/usr/bin/makedumpfile || ! -d $K/boot ]]; then
  rm -rf "$R" "$K"; mkdir -p "$R" "$K"
  for deb in "$D"/*.deb; do
    case $deb in *linux-image*) dpkg -x "$deb" "$K" ;; *) dpkg -x "$deb" "$R" ;; esac
  done
  ln -s usr/lib "$R/lib"   # merged /usr: the debs hold no /lib link, qemu-user -L needs one
fi
IMAGE=$(ls "$K"/boot/vmlinux-*); MODS=$(ls -d "$K"/usr/lib/modules/*)

# --- 2. initramfs images: capture (busybox, virtio_blk) and main (+ kexec, libc, capture image) ---
I=$RVOUT/initramfs; rm -rf "$I"; mkdir -p "$I"
mkroot() {  # mkroot DIR
  mkdir -p "$1"/{bin,sbin,dev,proc,sys,tmp,boot,lib/mods}
  cp "$R/usr/bin/busybox" "$1/bin/busybox"; ln -s busybox "$1/bin/sh"
  xz -dc "$(find "$MODS" -name virtio_blk.ko.xz)" > "$1/lib/mods/virtio_blk.ko"
  install -m 755 "$HERE/riscv64-init.sh" "$1/init"
}
cpio_of() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6); }
mkroot "$I/capture"; cpio_of "$I/capture" > "$I/capture.cpio.gz"
mkroot "$I/main"
mkdir -p "$I/main/usr/sbin" "$I/main/lib/riscv64-linux-gnu"
cp "$R/usr/sbin/kexec" "$I/main/usr/sbin/"   # kexec needs only libc and the dynamic loader
cp "$R/usr/lib/ld-linux-riscv64-lp64d.so.1" "$I/main/lib/"
cp "$R/usr/lib/riscv64-linux-gnu/libc.so.6" "$I/main/lib/riscv64-linux-gnu/"
cp "$I/capture.cpio.gz" "$I/main/boot/"
cpio_of "$I/main" > "$I/main.cpio.gz"

# --- 3. boot, kexec -p, panic, capture ---
rm -rf "$W"; mkdir -p "$W"
truncate -s $((MEM + 16))M "$W/vmcore.img"; truncate -s 1M "$W/info.img"
APPEND="console=ttyS0 crashkernel=$CRASHKERNEL init_on_free=1 panic=-1 lab=riscv64 $EXTRA"
echo "$APPEND" > "$W/cmdline.txt"
t0=$(date +%s)
timeout "${LAB_TIMEOUT:-1200}" qemu-system-riscv64 -M virt -cpu rv64 -smp 1 -m "$MEM" \
  -display none -monitor none -serial "file:$W/console.log" -no-reboot \
  -drive "file=$W/vmcore.img,format=raw,if=none,id=vmcore" -device virtio-blk-pci,drive=vmcore,serial=vmcore \
  -drive "file=$W/info.img,format=raw,if=none,id=info" -device virtio-blk-pci,drive=info,serial=info \
  -drive "file=$IMAGE,format=raw,if=none,id=kernel,readonly=on" -device virtio-blk-pci,drive=kernel,serial=kernel \
  -kernel "$IMAGE" -initrd "$I/main.cpio.gz" -append "$APPEND" > "$W/qemu.log" 2>&1 || true
echo "qemu: $(( $(date +%s) - t0 )) s" | tee "$W/timings.txt"
read -r tag size _ md5 _ < <(head -c 200 "$W/info.img" | tr -d '\0') || true
if [[ ${tag:-} != VMCORE-SIZE ]]; then
  echo "FAILED: the capture kernel left no vmcore; last console lines:"; tail -30 "$W/console.log"; exit 1
fi
head -c "$size" "$W/vmcore.img" > "$W/$NAME.vmcore"; rm -f "$W/vmcore.img" "$W/info.img"
[[ $(md5sum < "$W/$NAME.vmcore" | cut -d' ' -f1) == "$md5" ]] || { echo "md5 mismatch"; exit 1; }
echo "vmcore: $size bytes, md5 $md5 (matches the capture kernel's md5sum of /proc/vmcore)" | tee -a "$W/timings.txt"

# --- 4. makedumpfile and the expected outputs ---
# Debian's makedumpfile 1.7.8 (riscv64, under qemu-user) reads the log right but translates
# superpage leaves wrongly (makedumpfile 863e2c4, "riscv64: Fix huge page translation in
# vtop_riscv64()", May 2026, after 1.7.9): the vmemmap is mapped by 2 MiB leaves, so it reads the
# wrong struct pages and excludes nothing at -d 31. The expected outputs therefore come from
# upstream makedumpfile with that fix, built on the host as a cross-analysis binary for riscv64
# dumps (MDF_SRC: a makedumpfile checkout, checked at b7587f1); 1.7.8's results are kept beside.
# makedumpfile's Makefile would pass -U__x86_64__, which breaks glibc's headers, so the host's
# headers are included first (makedumpfile-cross-riscv64.h) and __x86_64__ undefined after them.
UP=$RVOUT/makedumpfile-upstream-riscv64
if [[ ! -x $UP/makedumpfile ]]; then
  : "${MDF_SRC:?set MDF_SRC to a makedumpfile checkout (github makedumpfile/makedumpfile, b7587f1 or later)}"
  rm -rf "$UP"; mkdir -p "$UP"
  if [[ -d $MDF_SRC/.git ]]; then git -C "$MDF_SRC" archive HEAD | tar -x -C "$UP"; else cp -a "$MDF_SRC/." "$UP/"; fi
  make -C "$UP" -j2 LINKTYPE=dynamic USELZO=on USEZSTD=on \
    CC="gcc -include $HERE/makedumpfile-cross-riscv64.h -D__riscv64__" > "$UP/build.log" 2>&1
fi
MDF_DEB=(qemu-riscv64-static -L "$R" "$R/usr/bin/makedumpfile")
MDF_UP=("$UP/makedumpfile")
"${MDF_UP[@]}" --dump-dmesg "$W/$NAME.vmcore" "$W/$NAME.makedumpfile-dmesg.txt" > "$W/mdf-dmesg.log" 2>&1
"${MDF_UP[@]}" -d 31 --message-level 31 "$W/$NAME.vmcore" "$W/mdf-d31.kdump" > "$W/mdf-d31.log" 2>&1
python3 "$HERE/riscv64_kept_pfns.py" "$W/mdf-d31.kdump" > "$W/$NAME.makedumpfile-d31-pfns.txt"
: > "$W/$NAME.makedumpfile-levels-pfns.txt"   # one class at a time: the bitmap of -d 2, 4, 8, 16
for level in 2 4 8 16; do
  "${MDF_UP[@]}" -d $level "$W/$NAME.vmcore" "$W/mdf-d$level.kdump" > "$W/mdf-d$level.log" 2>&1
  python3 "$HERE/riscv64_kept_pfns.py" "$W/mdf-d$level.kdump" "d$level" >> "$W/$NAME.makedumpfile-levels-pfns.txt"
  rm -f "$W/mdf-d$level.kdump"
done
"${MDF_DEB[@]}" --dump-dmesg "$W/$NAME.vmcore" "$W/mdf-1.7.8-dmesg.txt" > "$W/mdf-1.7.8-dmesg.log" 2>&1
"${MDF_DEB[@]}" -d 31 --message-level 31 "$W/$NAME.vmcore" "$W/mdf-1.7.8-d31.kdump" > "$W/mdf-1.7.8-d31.log" 2>&1
python3 "$HERE/riscv64_kept_pfns.py" "$W/mdf-1.7.8-d31.kdump" > "$W/mdf-1.7.8-d31-pfns.txt"
rm -f "$W/mdf-d31.kdump" "$W/mdf-1.7.8-d31.kdump"
counts() {  # makedumpfile's per-class page counts, in decimal
  python3 -c 'import re, sys; text = open(sys.argv[1], errors="replace").read().replace("\r", "\n")
print("; ".join(f"{k.strip()} {int(v, 16)}" for k, v in re.findall(r"\n +(Pages filled with zero|Non-private cache pages|Private cache pages|User process data pages|Free pages) *: (0x[0-9a-f]+)", text)))' "$1"
}
{
  echo "made by tests/arch/make-riscv64-dump.sh $NAME $EXTRA on $(date -u +%F)"
  echo "guest: qemu-system-riscv64 $(qemu-system-riscv64 --version | head -1 | awk '{print $4}') -M virt -cpu rv64 -smp 1 -m $MEM"
  echo "kernel: $KPKG ($(basename "$IMAGE")); cmdline: $APPEND"
  echo "capture: kexec-tools $(dpkg-deb -f "$D"/kexec-tools_*.deb Version) kexec -p (kexec_load), /proc/vmcore copied by dd"
  grep -a -m1 -E '^mmu' "$W/console.log" | tr -d '\r\t' || true
  cat "$W/timings.txt"
  echo "expected outputs: makedumpfile $("${MDF_UP[@]}" -v 2>&1 | head -1 | awk '{print $3}') ($(git -C "${MDF_SRC:-/nonexistent}" rev-parse --short HEAD 2>/dev/null || echo upstream), cross-analysis build)"
  echo "  -d 31: $(head -1 "$W/$NAME.makedumpfile-d31-pfns.txt") | $(counts "$W/mdf-d31.log")"
  echo "Debian makedumpfile $(dpkg-deb -f "$D"/makedumpfile_*.deb Version) (riscv64, qemu-user):"
  cmp -s "$W/mdf-1.7.8-dmesg.txt" "$W/$NAME.makedumpfile-dmesg.txt" && echo "  --dump-dmesg: identical" || echo "  --dump-dmesg: DIFFERS"
  echo "  -d 31: $(head -1 "$W/mdf-1.7.8-d31-pfns.txt") | $(counts "$W/mdf-1.7.8-d31.log")"
} > "$W/$NAME.info.txt"
cat "$W/$NAME.info.txt"
zstd -q -19 --long -f "$W/$NAME.vmcore" -o "$W/$NAME.vmcore.zst"
ls -l "$W"
