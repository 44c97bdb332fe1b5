"""Finding devices, and waiting for them: `discovery` (`Devices`, what handlers ask
for a share's transport or a disk's node, and `wait`), on `sysfs` (what is there),
`uevent` (a netlink socket: what arrives), `probe` (superblocks: LABEL, UUID, TYPE,
read by `probe_filesystems`, with the fields every reader reads, and
`probe_containers`) and `blank`
(the blank-disk check for x-makefs). Drivers are loaded through kmod/, imported
only when something must be loaded.

May import: kmod, results, report, kernel, spec, records.
"""
