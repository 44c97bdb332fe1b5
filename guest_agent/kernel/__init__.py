"""The kernel interface, with no policy: `syscalls` (the one door to system calls),
`mount` (mounting and unmounting with them; `syscalls_legacy` for mount(2) and
umount2(2), a leaf), `paths` (paths under the root reached by fd, never by a resolved
string) and `mountinfo` (the mount table, and the mount tree walked as a path lookup
walks it).

May import: spec, records.
"""
