"""The floor of a Python mount agent: the boot path's 11 mounts with nothing else.

Run in the benchmark guest as `python3 /bench/floor.py` (no arguments): the
plan is appended to this file by bench/boot_path.py as PLAN = [...], holding
(fstype, source, where, options) with LABEL= already resolved to the device.
Only `os` and `ctypes` are imported: no option parsing, discovery, module
loading, locking, reporting or error handling. What the agent spends above
this is the price of what it does on top (and of how it is written).
"""

import ctypes
import os

PLAN: list = []  # filled in by boot_path.py

libc = ctypes.CDLL(None, use_errno=True)
for fstype, source, where, options in PLAN:
    flags = 0
    data = []
    for o in options.split(",") if options else ():
        if o == "ro":
            flags |= 1
        else:
            data.append(o)
    if fstype == "overlay":
        for o in data:
            if o.startswith(("upperdir=", "workdir=")):
                os.makedirs(o.split("=", 1)[1], exist_ok=True)
    os.makedirs(where, exist_ok=True)
    if (
        libc.mount(source.encode(), where.encode(), fstype.encode(), flags, ",".join(data).encode())
        != 0
    ):
        e = ctypes.get_errno()
        raise SystemExit(f"mount {where}: {os.strerror(e)}")
