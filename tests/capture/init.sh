#!/bin/sh
# /init of the capture-kernel tests' initramfs images (busybox sh). Two roles:
#  - 1st kernel (no /proc/vmcore): load the capture kernel with kexec -p (kernel, initrd and
#    command line from /boot and /etc/capture-append), log the last lines the test looks for
#    in the dump, then crash with sysrq-c.
#  - capture kernel (/proc/vmcore exists): mount every virtio disk that holds a filesystem at
#    /mnt/SERIAL, run /job.sh with its output in /mnt/out/job.log and its exit code in
#    /mnt/out/job.rc, keep this kernel's dmesg and meminfo beside them, power off.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp /mnt && mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
log() { echo "<5>VMCAPTEST: $*" > /dev/kmsg; }

mount_disks() {  # every vdX with a serial and a filesystem, at /mnt/SERIAL (waits for them)
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vda ] && break; sleep 0.3; done
  for d in /sys/block/vd*; do
    s=$(cat "$d/serial" 2>/dev/null) || continue
    [ -n "$s" ] || continue
    mkdir -p "/mnt/$s"
    mount -t ext4 "/dev/${d##*/}" "/mnt/$s" 2>/dev/null || rmdir "/mnt/$s"
  done
}

if [ -e /proc/vmcore ]; then
  log "capture kernel up: $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu, $(grep MemTotal /proc/meminfo)"
  mount_disks
  if [ -d /mnt/out ]; then
    cat /proc/meminfo > /mnt/out/meminfo-capture.txt
    cat /proc/cmdline > /mnt/out/cmdline-capture.txt
    sh /job.sh > /mnt/out/job.log 2>&1
    echo $? > /mnt/out/job.rc
    dmesg > /mnt/out/dmesg-capture.txt
    sync
    for m in /mnt/*; do umount "$m" 2>/dev/null; done
  else
    log "no output disk"
  fi
  log "capture done, powering off"
  poweroff -f
fi

# ---------------- 1st kernel ----------------
log "1st kernel up: $(uname -r); $(cat /sys/kernel/kexec_crash_size) bytes reserved for the capture kernel"
/sbin/kexec -p /boot/vmlinuz --initrd=/boot/capture.img --append="$(cat /etc/capture-append)" \
  > /tmp/kexec.txt 2>&1
if [ "$(cat /sys/kernel/kexec_crash_loaded)" != 1 ]; then
  log "kexec -p failed: $(cat /tmp/kexec.txt)"
  poweroff -f
fi
log "capture kernel loaded"
for line in $(cat /etc/last-words); do log "last words: $line"; done
# bench/capture_speed.py puts memory to use first (page cache, anonymous memory).
[ -f /etc/before-crash ] && sh /etc/before-crash
echo c > /proc/sysrq-trigger
while true; do sleep 3600; done
