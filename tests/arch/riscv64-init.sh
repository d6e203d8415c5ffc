#!/bin/sh
# /init of the riscv64 kdump initramfs (busybox sh); see make-riscv64-dump.sh.
# 1st kernel: load the capture kernel (Image from the disk with serial "kernel") with kexec -p,
# log a marker line, panic with sysrq-c.
# Capture kernel (has /proc/vmcore): copy /proc/vmcore to the virtio disk with serial "vmcore",
# write its size and md5sum to the disk with serial "info", power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
insmod /lib/mods/virtio_blk.ko
log() { echo "VMCAPLAB-riscv64: $*"; echo "<5>VMCAPLAB-riscv64: $*" > /dev/kmsg; }
disk() { for b in /sys/block/vd*; do [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${b##*/}"; done; }
if [ -e /proc/vmcore ]; then
  echo "capture kernel: $(uname -r); /proc/vmcore is $(stat -c %s /proc/vmcore) bytes"
  out=$(disk vmcore); info=$(disk info)
  dd if=/proc/vmcore of="$out" bs=1M 2>&1 | tail -1
  size=$(stat -c %s /proc/vmcore); md5=$(md5sum /proc/vmcore | cut -d' ' -f1)
  printf 'VMCORE-SIZE %s MD5 %s END\n' "$size" "$md5" | dd of="$info" conv=notrunc 2>/dev/null
  sync
  echo "vmcore copied: $size bytes, md5 $md5"
  poweroff -f
fi
log "1st kernel up: $(uname -r) $(uname -m)"
log "/sys/kernel/vmcoreinfo: $(cat /sys/kernel/vmcoreinfo 2>&1)"
log "VMCAPLAB-MARKER: the quick brown fox jumps over the lazy dog"
log "cmdline: $(cat /proc/cmdline)"
echo "--- /proc/iomem"; cat /proc/iomem
grep -E '^mmu' /proc/cpuinfo | head -1
# kexec-tools 2.0.32 (kexec/arch/riscv/kexec-riscv.c get_memory_ranges) leaves every /proc/iomem
# range other than "System RAM", "Kernel code" and "Kernel data" out of the dump's PT_LOADs,
# including the "Reserved" memblock ranges inside System RAM that hold mem_section, the struct
# pages and the page tables: makedumpfile cannot read such a dump ("Can't get the address of
# mem_section"). kexec-tools reads /proc/iomem, so it gets a copy without those nested "Reserved"
# lines; the dump then covers System RAM minus the crashkernel region and the firmware's reserved
# memory. Top-level entries stay as they are.
if grep -q 'lab_iomem=kexec-tools' /proc/cmdline; then
  log "iomem: as kexec-tools reads it"
else
  # The firmware's reserved-memory (OpenSBI at the start of RAM, PMP-protected: reading it from
  # /proc/vmcore fails with EFAULT; OpenSBI 1.1 does not mark it no-map) stays out, found by the
  # unit address of its device-tree node.
  keep=$(for n in /sys/firmware/devicetree/base/reserved-memory/*@*; do [ -e "$n" ] && echo "${n##*@}"; done)
  log "firmware reserved-memory kept out of the dump: $keep"
  awk -v keep=" $keep " '!/^ +[0-9a-f]+-[0-9a-f]+ : Reserved$/ { print; next }
    { split($1, r, "-"); a = r[1]; sub(/^0+/, "", a); if (index(keep, " " a " ")) print }' /proc/iomem > /tmp/iomem
  mount --bind /tmp/iomem /proc/iomem && log "iomem: nested Reserved ranges hidden from kexec"
  echo "--- /proc/iomem as kexec-tools sees it"; cat /proc/iomem
fi
# The Image comes from the raw virtio disk with serial "kernel" (kexec-tools reads block devices):
# kept in the initramfs, it and kexec's copy of it do not fit in 256 MiB beside crashkernel=96M.
kexec -p "$(disk kernel)" --initrd=/boot/capture.cpio.gz \
  --append="console=ttyS0 nr_cpus=1 reset_devices panic=-1 lab_2nd=1" && log "kexec -p loaded" || log "kexec -p FAILED"
# The loaded segments are now in the crashkernel region; drop the Image's page cache and the
# capture initramfs file (init_on_free zeroes the freed pages).
rm -f /boot/capture.cpio.gz; sync; echo 3 > /proc/sys/vm/drop_caches
log "crashing"
echo c > /proc/sysrq-trigger
while true; do sleep 3600; done
