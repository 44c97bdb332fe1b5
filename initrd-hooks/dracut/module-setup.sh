#!/bin/bash
# dracut module "guest-agent": mounts the microVM's virtio shares, volumes and
# the /nix/store overlay under /sysroot in a systemd initrd, after the root is
# mounted and before the switch to it.
# Install this directory as /usr/lib/dracut/modules.d/90guest-agent/, then
# `dracut -f` (see docs/dracut.md).

# Included whenever guest-agent is installed (host-only or not).
check() {
    local py
    py=$(command -v python3) || return 1
    "$py" -c 'import guest_agent' 2> /dev/null || return 1
    return 0
}

depends() {
    echo systemd
    return 0
}

installkernel() {
    # The agent loads these itself (no udev needed) when they are not built in.
    # vmw_vsock_virtio_transport: sd_notify to the host, only with vmm.notify_socket.
    hostonly='' instmods virtio_pci virtio_mmio virtio_blk 9p 9pnet_virtio virtiofs fuse \
        overlay ext4 erofs squashfs vmw_vsock_virtio_transport ${guest_agent_drivers-}
}

install() {
    local py stdlib
    py=$(readlink -f "$(command -v python3)")
    inst_binary "$py"
    [[ $py == /usr/bin/python3 ]] || ln_r "$py" /usr/bin/python3

    # The standard library minus what a boot never uses, and every file of the
    # guest-agent distribution and of its dependencies (click), wherever they
    # are installed; sqlite3 too for a store overlay with x-nix-db (the dracut
    # setting guest_agent_nix_db=auto|yes|no, default auto: when
    # /etc/guest-agent/mounts.json or the running kernel's command line asks for
    # it; the lister says what it decided).
    local -a files
    mapfile -t files < <("$py" "$moddir/list-files.py" --nix-db="${guest_agent_nix_db:-auto}" \
        --config=/etc/guest-agent/mounts.json) || return 1
    ((${#files[@]})) || {
        derror "guest-agent: could not list the agent's Python files"
        return 1
    }
    inst_multiple "${files[@]}" || return 1
    # dracut-install resolves the libraries of executables only; extension
    # modules (mode 644) need theirs listed (ldd prints the whole closure:
    # _sqlite3 brings libsqlite3.so.0).
    local -a libs
    mapfile -t libs < <(printf '%s\n' "${files[@]}" | grep '\.so$' | xargs -r ldd 2> /dev/null \
        | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' | sort -u)
    ((${#libs[@]})) && { inst_multiple "${libs[@]}" || return 1; }

    inst_script "$moddir/guest-agent-initrd.sh" /usr/lib/guest-agent/initrd-mount-all
    inst_simple "$moddir/guest-agent.service" "$systemdsystemunitdir/guest-agent.service"
    mkdir -p "${initdir}${systemdsystemunitdir}/initrd-fs.target.wants"
    ln_r "$systemdsystemunitdir/guest-agent.service" \
        "$systemdsystemunitdir/initrd-fs.target.wants/guest-agent.service"

    # Build-time configuration: the JSON config and the boot policy.
    [[ -f /etc/guest-agent/mounts.json ]] && inst_simple /etc/guest-agent/mounts.json
    [[ -f /etc/guest-agent/initrd.conf ]] && inst_simple /etc/guest-agent/initrd.conf

    # mke2fs, for x-makefs volumes.
    inst_multiple -o mke2fs mkfs.ext4 /etc/mke2fs.conf
    # libblkid, which the x-makefs blank check loads by soname (ctypes); systemd and
    # mke2fs usually bring it already.
    inst_libdir_file "libblkid.so.1*"
    return 0
}
