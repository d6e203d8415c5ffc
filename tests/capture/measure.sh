# Sourced by the capture-kernel job scripts (busybox sh).
# measure NAME CMD...: runs CMD with stdout in NAME.out and stderr in NAME.err, its exit code
# in NAME.rc, and its memory in NAME.mem, sampled every 0.2 s while it runs: the largest
# VmHWM, RssAnon, RssFile and RssShmem of the process (kB) and the smallest MemAvailable of
# the capture kernel (kB). RssFile/RssShmem count mapped /proc/vmcore pages (old memory, not
# this kernel's) and the initramfs files (already in RAM), so RssAnon and MemAvailable are
# what the capture kernel's budget pays.
measure() {
  name=$1; shift
  "$@" > "$name.out" 2> "$name.err" &
  pid=$!
  hwm=0; anon=0; file=0; shmem=0; avail=999999999
  while kill -0 "$pid" 2>/dev/null; do
    set -- $(awk '/^VmHWM|^RssAnon|^RssFile|^RssShmem/{printf "%s ", $2}' "/proc/$pid/status" 2>/dev/null) 0 0 0 0
    [ "$1" -gt "$hwm" ] && hwm=$1
    [ "$2" -gt "$anon" ] && anon=$2
    [ "$3" -gt "$file" ] && file=$3
    [ "$4" -gt "$shmem" ] && shmem=$4
    a=$(awk '/^MemAvailable/{print $2}' /proc/meminfo)
    [ "$a" -lt "$avail" ] && avail=$a
    sleep 0.2
  done
  wait "$pid"
  rc=$?
  echo "$rc" > "$name.rc"
  echo "VmHWM=$hwm RssAnon=$anon RssFile=$file RssShmem=$shmem MemAvailable_min=$avail" > "$name.mem"
  return "$rc"
}
