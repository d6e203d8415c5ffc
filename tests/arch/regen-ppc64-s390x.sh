#!/bin/bash
# regen-ppc64-s390x.sh: makes the real ppc64le and s390x dumps of tests/data/ and the expected
# outputs that tests/test_arch_ppc64.py and tests/test_arch_s390x.py compare vmcap with.
#
#   bash tests/arch/regen-ppc64-s390x.sh [NAME...]     (from the repository root; NAME in
#                                  ppc64-radix ppc64-hash s390x (the default) and ppc64-powernv)
#
# ppc64-radix and ppc64-hash are pseries guests (POWER9 radix MMU; disable_radix for hash);
# ppc64-powernv is a bare-metal powernv9 guest (radix, no hypervisor, little-endian ELF headers),
# which QEMU will not run in less than 1 GiB: its dump is not committed (tests skip without it).
#
# Needs root on Debian 12 with the lab recipe at ../shared/lab/arch (relative to the repository):
#   apt-get install -y qemu-system-ppc qemu-system-misc qemu-user-static zstd cpio
# Foreign packages are downloaded with apt (dpkg --add-architecture) and unpacked with dpkg -x,
# never installed. Work files go to $WORK (default /var/tmp/vmcap-arch-ps); the results are copied
# to tests/data/:
#   NAME.elf.zst          QEMU 7.2 dump-guest-memory ELF of a 256 MiB TCG guest that panicked with
#                         sysrq-c (Debian linux-image 6.1.0-50, busybox initramfs), zstd -19 --long
#   NAME.vmcoreinfo       the kernel's VMCOREINFO, taken from guest memory (extract_vmcoreinfo.py):
#                         QEMU has no vmcoreinfo device on pseries and s390-ccw-virtio
#   NAME.dmesg.txt        makedumpfile 1.7.2 (the foreign-arch Debian build, under qemu-user-static)
#                         --dump-dmesg -i NAME.vmcoreinfo of the dump
#   NAME.dN-pfns.txt      the pfns makedumpfile -c -d N keeps (its kdump output's 2nd bitmap), as
#                         "start end" ranges (end exclusive), read by tests/arch/kept_pfns.py with
#                         vmcap's kdump reader; N in $LEVELS (31 2 4 8 16)
# makedumpfile 1.7.2 reads program header i at offset 64 + 56 * i, and QEMU 7.2 puts them at 192;
# makedumpfile on ppc64le reads ELF headers natively, and QEMU 7.2 writes pseries headers
# big-endian: it is run on a copy with the program headers moved to 64 and, for ppc64, the
# headers made little-endian (elf_for_makedumpfile.py; no data byte changes).
# Guests run with -action panic=pause: pseries kernels call RTAS ibm,os-term when they panic and
# QEMU's default is then to exit before anything is dumped. STAGE=boot stops after the dumps;
# LEVELS (default "31 2 4 8 16") picks the dump levels; WORK, KVER, MEM as below.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
LAB=${LAB:-$REPO/../shared/lab/arch}
[[ -d $LAB ]] || LAB=/work/shared/lab/arch
WORK=${WORK:-/var/tmp/vmcap-arch-ps}
DATA=$REPO/tests/data
KVER=${KVER:-6.1.0-50}
MEM=${MEM:-256}
LEVELS=${LEVELS:-31 2 4 8 16}
NAMES=${*:-ppc64-radix ppc64-hash s390x}
mkdir -p "$WORK/debs" "$DATA"
export ARCHOUT=$WORK ARCHLAB=$LAB WANT=${WANT:-"Kernel panic - not syncing"}

debarch() { case $1 in ppc64*) echo ppc64el ;; s390x) echo s390x ;; esac; }
kflavour() { case $1 in ppc64el) echo powerpc64le ;; s390x) echo s390x ;; esac; }

fetch_debs() {  # $1 = Debian architecture
  local a=$1
  dpkg --print-foreign-architectures | grep -qx "$a" || { dpkg --add-architecture "$a"; apt-get update -qq; }
  (cd "$WORK/debs" && for p in "linux-image-$KVER-$(kflavour "$a")" busybox-static makedumpfile \
      libc6 libdw1 libelf1 liblzo2-2 zlib1g liblzma5 libbz2-1.0 libzstd1; do
     ls ./"${p}"_*_"$a".deb > /dev/null 2>&1 || apt-get download -qq "$p:$a"; done)
  local root=$WORK/root-$a
  if [[ ! -x $root/usr/bin/makedumpfile ]]; then
    mkdir -p "$root"
    for d in "$WORK"/debs/*_"$a".deb; do [[ $d = */linux-image-* ]] || dpkg -x "$d" "$root"; done
    # qemu-user's -L prefix does not apply to absolute symlink targets: make the loader link relative
    for l in "$root"/lib64/ld64.so.* "$root"/lib/ld64.so.*; do
      [[ -L $l && $(readlink "$l") = /* ]] && ln -sf "..$(readlink "$l")" "$l"
    done
  fi
  [[ -d $WORK/kernel-$a ]] || dpkg -x "$WORK"/debs/linux-image-"$KVER"-*_"$a".deb "$WORK/kernel-$a"
}

boot() {  # $1 = NAME: boots the guest to its panic and writes $WORK/NAME/NAME.elf
  local name=$1 a; a=$(debarch "$name")
  local dir=$WORK/$name
  rm -f "$DATA/$name.elf.zst"
  mkdir -p "$dir/bb"; cp -a "$WORK/root-$a/bin" "$dir/bb/"   # mkinit.sh wants ARCHOUT/ARCH/bb/bin/busybox
  bash "$LAB/mkinit.sh" "$name"
  local k=$WORK/kernel-$a/boot
  case $name in
    ppc64-radix|ppc64-hash)
      local extra=""; [[ $name = ppc64-hash ]] && extra=" disable_radix"
      bash "$LAB/boot-dump.sh" "$name" "$name" qemu-system-ppc64 -M pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off \
        -cpu power9 -smp 1 -action panic=pause -m "$MEM" -nographic -nodefaults -serial "file:$dir/$name.console.txt" \
        -kernel "$k/vmlinux-$KVER-powerpc64le" -initrd "$dir/init.cpio.gz" \
        -append "console=hvc0 panic=0 nokaslr$extra" ;;
    ppc64-powernv)
      bash "$LAB/boot-dump.sh" "$name" "$name" qemu-system-ppc64 -M powernv9 -cpu power9 -smp 1 -m 1G \
        -action panic=pause -nographic -nodefaults -serial "file:$dir/$name.console.txt" \
        -kernel "$k/vmlinux-$KVER-powerpc64le" -initrd "$dir/init.cpio.gz" -append "console=hvc0 panic=0" ;;
    s390x)
      bash "$LAB/boot-dump.sh" "$name" "$name" qemu-system-s390x -M s390-ccw-virtio -cpu max -smp 1 -action panic=pause -m "$MEM" \
        -nographic -nodefaults -serial "file:$dir/$name.console.txt" \
        -kernel "$k/vmlinuz-$KVER-s390x" -initrd "$dir/init.cpio.gz" -append "console=ttysclp0 panic=0" ;;
  esac
}

expected() {  # $1 = NAME: the files makedumpfile gives
  local name=$1 a; a=$(debarch "$name")
  local dir=$WORK/$name root=$WORK/root-$a qemu_user
  case $a in ppc64el) qemu_user=qemu-ppc64le-static ;; s390x) qemu_user=qemu-s390x-static ;; esac
  local mdf=("$qemu_user" -L "$root" "$root/usr/bin/makedumpfile")
  python3 "$REPO/tests/arch/extract_vmcoreinfo.py" "$dir/$name.elf" "$dir/$name.vmcoreinfo"
  local le=""; [[ $a = ppc64el ]] && le=--little-endian-headers
  python3 "$REPO/tests/arch/elf_for_makedumpfile.py" "$dir/$name.elf" "$dir/$name.phdr64.elf" $le
  rm -f "$dir/$name.mdf-dmesg.txt" "$dir/$name.mdf-d31.kdump"
  "${mdf[@]}" --dump-dmesg -i "$dir/$name.vmcoreinfo" "$dir/$name.phdr64.elf" "$dir/$name.mdf-dmesg.txt"
  for level in $LEVELS; do
    rm -f "$dir/$name.mdf-d$level.kdump"
    "${mdf[@]}" -c -d "$level" -i "$dir/$name.vmcoreinfo" "$dir/$name.phdr64.elf" "$dir/$name.mdf-d$level.kdump"
    (cd "$REPO" && PYTHONPATH=$REPO python3 "$REPO/tests/arch/kept_pfns.py" "$dir/$name.mdf-d$level.kdump") \
      > "$DATA/$name.d$level-pfns.txt"
  done
  cp "$dir/$name.vmcoreinfo" "$DATA/$name.vmcoreinfo"
  cp "$dir/$name.mdf-dmesg.txt" "$DATA/$name.dmesg.txt"
  # the compressed dump is made once per boot (boot() removes it)
  [[ -s $DATA/$name.elf.zst ]] || zstd -q -f -19 --long=27 -T2 "$dir/$name.elf" -o "$DATA/$name.elf.zst"
  chmod 644 "$DATA/$name".*
  ls -l "$DATA/$name".*
}

for name in $NAMES; do
  fetch_debs "$(debarch "$name")"
  [[ -s $WORK/$name/$name.elf ]] || boot "$name"
  [[ ${STAGE:-} = boot ]] || expected "$name"
done
