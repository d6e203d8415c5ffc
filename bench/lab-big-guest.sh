#!/bin/bash
# A real dump of a guest whose memory is in use, for bench/threads1.py --source (issue 11).
#
#   LAB_OUT=/var/tmp/lab-perf bench/lab-big-guest.sh [MEM_MB=6144]
#
# Uses the lab (../shared/lab: its kernel in $LAB_OUT/kernel, its initramfs, lib.sh, qmp.py; run
# ../shared/lab/setup.sh first, or link $LAB_OUT/kernel to another lab output's kernel). The
# guest's /init (appended to the lab's main initramfs as a second cpio) reads a disk of /usr/lib
# files into the page cache, fills anonymous memory from a disk of /usr/share and Python files
# (dd processes holding 512 MiB buffers while blocked on a pipe), leaves the rest free, and
# panics; QMP dump-guest-memory then writes $LAB_OUT/big.elf (program headers moved to offset
# 64 for makedumpfile). 80 s under TCG for 6 GiB on a quiet 2-core host, 350 s on a busy one
# (where the fill may stop short: the guest waits at most 300 s for its anonymous memory), and
# 11 GiB of disk (the two disk images are deleted at the end).
set -euo pipefail
: "${LAB_OUT:?set LAB_OUT (e.g. /var/tmp/lab-perf)}"
export LAB_OUT
HERE=$(cd "$(dirname "$0")" && pwd)
LABDIR=${LABDIR:-$HERE/../../shared/lab}
source "$LABDIR/lib.sh"
MEM=${1:-6144}
CACHE_BYTES=$((MEM * 1024 * 1024 * 5 / 12))  # 2.5 GiB of 6: page cache
ANON_BYTES=$((4 * 512 * 1024 * 1024))  # four dd buffers of 512 MiB: anonymous memory
D=$OUT
"$LABDIR/mkinitramfs.sh" > /dev/null

echo "disks: $((CACHE_BYTES >> 20)) MiB for the page cache, $((ANON_BYTES >> 20)) MiB for anonymous memory"
find /usr/lib -type f -size +4k 2>/dev/null | sort | xargs cat 2>/dev/null | head -c "$CACHE_BYTES" > "$D/cache.img" || true
find /usr/share "$(python3 -c 'import sys; print(sys.prefix)')" -type f 2>/dev/null | sort | xargs cat 2>/dev/null \
  | head -c "$ANON_BYTES" > "$D/anon.img" || true

mkdir -p "$D/overlay"
cat > "$D/overlay/init" <<'EOF'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /lib/mods/order); do insmod "/lib/mods/$m" 2>/dev/null; done
log() { echo "VMCAPLAB: $*"; echo "<5>VMCAPLAB: $*" > /dev/kmsg; }
disk() { for d in /sys/block/vd*; do [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }; done; return 1; }
sleep 1
C=$(disk cache); A=$(disk anon)
log "filling: page cache from $C, anonymous memory from $A"
dd if="$C" of=/dev/null bs=1M 2>/dev/null
log "page cache read"
# dd keeps its buffer (anonymous memory, filled from the disk) while it waits on the full pipe
for i in 0 1 2 3; do
  dd if="$A" bs=512M count=1 skip=$i 2>/dev/null | sleep 100000 &
done
i=0
while [ $i -lt 300 ] && [ "$(awk '/AnonPages/{print $2}' /proc/meminfo)" -lt 2000000 ]; do sleep 1; i=$((i+1)); done
grep -E "MemTotal|MemFree|^Cached|AnonPages|Buffers" /proc/meminfo
log "filled"
sleep 2
echo c > /proc/sysrq-trigger
EOF
chmod 755 "$D/overlay/init"
(cd "$D/overlay" && echo init | cpio -o -H newc --quiet | gzip) > "$D/overlay.cpio.gz"
cat "$D/initramfs/main.cpio.gz" "$D/overlay.cpio.gz" > "$D/guest.cpio.gz"

SOCK=$D/big.qmp; LOG=$D/big.console.log
rm -f "$LOG" "$D/big.elf"
t0=$(date +%s)
lab_qemu_bg big "$D/big.qemu.log" -m "$MEM" -smp 1 -display none -monitor none \
  -serial "file:$LOG" -qmp "unix:$SOCK,server=on,wait=off" -no-reboot -device vmcoreinfo \
  -drive "file=$D/cache.img,format=raw,if=none,id=dc,readonly=on" -device virtio-blk-pci,drive=dc,serial=cache \
  -drive "file=$D/anon.img,format=raw,if=none,id=da,readonly=on" -device virtio-blk-pci,drive=da,serial=anon \
  -kernel "$VMLINUZ" -initrd "$D/guest.cpio.gz" -append "console=ttyS0 panic=0"
trap 'lab_qemu_stop big' EXIT
lab_wait_for "$LOG" "end Kernel panic" 1200 || { echo "no panic; see $LOG"; exit 1; }
grep -a -E "MemTotal|MemFree|Buffers|AnonPages" "$LOG" || true
sleep 2
python3 "$LABDIR/qmp.py" "$SOCK" dump elf "$D/big.elf" > /dev/null
python3 "$LABDIR/qmp.py" "$SOCK" quit > /dev/null 2>&1 || true
rm -f "$D/cache.img" "$D/anon.img"
chmod 644 "$D/big.elf"
python3 -c "import sys; sys.path.insert(0, '$HERE'); from pathlib import Path; import threads1; threads1.move_phdrs_after_ehdr(Path('$D/big.elf'))"
echo "$D/big.elf: $(stat -c %s "$D/big.elf") bytes, $(( $(date +%s) - t0 )) s from boot"
