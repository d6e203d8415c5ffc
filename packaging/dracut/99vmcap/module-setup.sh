#!/bin/bash
# dracut module "vmcap": puts vmcap's self-contained bundle (packaging/build-bundle.py,
# unpacked on this machine at /usr/lib/vmcap) into an initramfs, with /usr/bin/vmcap and
# /usr/bin/vmcap-makedumpfile. For kdump-utils' mkdumprd, in /etc/kdump.conf:
#   core_collector vmcap-makedumpfile -l --message-level 7 -d 31
#   dracut_args --add vmcap
# The bundle carries its own loader, libc and Python, so nothing is resolved from the host:
# it is copied as it is (dracut's inst would add the host's libraries for its ELF files).
# A squashfs bundle (the default layout) is mounted by its wrappers on first use: the image
# also gets mount and the loop and squashfs kernel modules.

VMCAP_BUNDLE_DIR=${VMCAP_BUNDLE_DIR:-/usr/lib/vmcap}

check() {
    # on request only (--add vmcap / add_dracutmodules+=" vmcap "), and only with a bundle
    [[ -x $VMCAP_BUNDLE_DIR/bin/vmcap-makedumpfile ]] || return 1
    return 255
}

depends() {
    return 0
}

installkernel() {
    # the wrappers mount vmcap.squashfs with -o loop
    [[ -f $VMCAP_BUNDLE_DIR/vmcap.squashfs ]] && hostonly='' instmods loop squashfs
    return 0
}

install() {
    mkdir -p "$initdir/usr/lib" "$initdir/usr/bin" || return 1
    # the wrappers know the bundle at /usr/lib/vmcap, wherever it was found on this machine
    cp -a "$VMCAP_BUNDLE_DIR" "$initdir/usr/lib/vmcap" || return 1
    if [[ -f $VMCAP_BUNDLE_DIR/vmcap.squashfs ]]; then
        inst_multiple mount modprobe || return 1
    fi
    # after kdumpbase (module order), so these replace whatever mkdumprd copied for the
    # core_collector's first word (e.g. pip's console script, which needs the host's Python)
    for name in vmcap vmcap-makedumpfile; do
        rm -f "$initdir/usr/bin/$name"
        cp -a "$VMCAP_BUNDLE_DIR/bin/$name" "$initdir/usr/bin/$name" || return 1
    done
}
