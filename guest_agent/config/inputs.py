"""The agent's inputs: where they are, and reading them safely.

The config file and the command line are read as hostile input: only a regular
file (or /dev/null) of bounded size is read, never trusting st_size; then parsed
and merged (merge.py), each problem reported.
"""

from __future__ import annotations

import errno
import os

from guest_agent.config.merge import DEFAULT_CMDLINE, DEFAULT_CONFIG
from guest_agent.kernel.mountinfo import major_minor

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.report import Reporter
    from guest_agent.spec import Config

CONFIG_LIMIT = 4 << 20  # bytes: inputs larger than this are refused, never read whole
CMDLINE_LIMIT = 64 << 10


class Sources:
    """Where the inputs are. A plain class, not a record: one fewer `namedtuple` to build
    (its `eval`) on every boot."""

    __slots__ = ("cmdline", "cmdline_text", "config", "config_given", "root")

    def __init__(self, root: str, config: str, config_given: bool, cmdline: str) -> None:
        self.root = root  # real path of the target root
        self.config = config
        self.config_given = config_given
        self.cmdline = cmdline
        self.cmdline_text = ""  # what `load` read from CMDLINE


def sources(root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE) -> Sources:
    return Sources(os.path.realpath(root), config or DEFAULT_CONFIG, config is not None, cmdline)


def load(src: Sources, reporter: Reporter, say_if_empty: bool = True) -> Config:
    """Read and merge the config file and the command line; report their problems.

    When no mount is configured and nothing was wrong (SAY_IF_EMPTY), say so: in a
    boot log, silence looks like an agent that never ran."""
    from guest_agent.config.merge import merge, parse_cmdline, parse_config_json
    from guest_agent.spec import Parsed, Problem

    layers: list[Parsed] = []
    data, why = _read(src.config, CONFIG_LIMIT)
    if data is not None:
        try:
            layers.append(parse_config_json(data.decode(), src.config))
        except UnicodeDecodeError as e:  # RFC 8259: JSON text is UTF-8
            reason = f"not valid JSON: not UTF-8 (byte {e.start})"
            layers.append(Parsed(problems=(Problem(src.config, reason),)))
    elif why is not None or src.config_given:  # a missing default file is no error
        reason = f"cannot read the config file: {why or _MISSING}"
        layers.append(Parsed(problems=(Problem(src.config, reason),)))
    config_state = "" if data is not None else " (unreadable)" if why else " (absent)"
    data, why = _read(src.cmdline, CMDLINE_LIMIT)
    if data is None:
        reason = f"cannot read the command line: {why or _MISSING}"
        layers.append(Parsed(problems=(Problem(src.cmdline, reason),)))
    else:
        src.cmdline_text = data.decode(errors="replace")
        layers.append(parse_cmdline(src.cmdline_text))
    config, problems = merge(layers)
    for problem in problems:
        reporter.problem(problem)
    if say_if_empty and not config.mounts and not any(p.fatal for p in problems):
        reporter.info(
            f"nothing to mount: no mount is configured in {src.config}{config_state}"
            f" or {src.cmdline}"
        )
    return config


_MISSING = os.strerror(errno.ENOENT)
_KINDS = {0o040000: "a directory", 0o010000: "a FIFO", 0o020000: "a character device",
          0o060000: "a block device", 0o140000: "a socket"}  # fmt: skip
_DEV_NULL = (1, 3)  # major, minor of /dev/null: `--config /dev/null` means "no config"


def _read(path: str, limit: int) -> tuple[bytes | None, str | None]:
    """(contents, None) of a regular file of at most LIMIT bytes; else (None, why not).

    Why not is None when the file does not exist. The file is opened
    non-blocking and checked before reading, so a FIFO, a device or a directory
    is refused at once; at most LIMIT + 1 bytes are read, never trusting
    st_size (/proc/cmdline says 0). /dev/null reads as empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, e.strerror or str(e)
    try:
        st = os.fstat(fd)
        kind = st.st_mode & 0o170000
        if kind != 0o100000:  # S_IFREG
            if kind == 0o020000 and major_minor(st.st_rdev) == _DEV_NULL:
                return b"", None
            return None, f"it is {_KINDS.get(kind, 'not a regular file')}, not a regular file"
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            known = f"{st.st_size} bytes" if st.st_size > limit else f"more than {limit} bytes"
            return None, f"it is too large ({known}; the limit is {_size(limit)})"
        return b"".join(chunks), None
    except OSError as e:
        return None, e.strerror or str(e)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
