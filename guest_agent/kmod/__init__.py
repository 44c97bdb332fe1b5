"""A small modprobe: `loader` (`ModuleLoader`: dependencies first, each module once,
independent modules in parallel through `fanout`), `resolve` (what a name or alias
stands for, what is in already), `index` and `binindex` (depmod's indexes, text and
binary), `conf` (modprobe.d), `image` (a module file handed to the kernel,
decompressed here when the kernel cannot) and `coldplug` (the drivers of virtio
devices that have none, without udev).

May import: config, kernel, spec, records.
"""
