"""Planning: order the specs as a graph (parents before children, layers before the overlay).

Pure: works on parsed specs only, so it is tested without root or devices.
"""

from __future__ import annotations

from guest_agent.records import NamedTuple
from guest_agent.spec import Config, MountSpec, OverlaySpec, Problem, ShareSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class Step(NamedTuple):
    spec: MountSpec
    after: tuple[str, ...]  # WHEREs of the steps that must be mounted first
    store_lower: bool = False  # the overlay's lower layer: immutable, mounted read-only by default

    @property
    def where(self) -> str:
        return self.spec.where


def is_within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


class _Node:
    __slots__ = ("children", "where")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.where: str | None = None


class Holders:
    """Mount points in a trie of path components: the deepest one holding a path is found
    in O(len(path)), whatever the number of mount points (a list would cost O(n) a path).

    `holder(path)` is the longest WHERE with `is_within(path, WHERE)`; WHEREs are expected
    normalised (as the parsers return them). The first WHERE added at a point is kept.
    """

    def __init__(self, wheres: Iterable[str] = ()) -> None:
        self._root = _Node()
        for where in wheres:
            self.add(where)

    def add(self, where: str) -> None:
        node = self._root
        for part in where.rstrip("/").split("/"):
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
        if node.where is None:
            node.where = where

    def holder(self, path: str, *, strict: bool = False) -> str | None:
        """The deepest WHERE that contains PATH (strictly above it when STRICT)."""
        best = None
        node = self._root
        parts = path.split("/")
        last = len(parts) - 1
        for i, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                break
            node = child
            if node.where is not None and not (strict and i == last):
                best = node.where
        return best


def owner_of(path: str, specs: Iterable[MountSpec]) -> MountSpec | None:
    """The spec whose mount will hold PATH (the deepest WHERE containing it)."""
    best = None
    for spec in specs:  # one path: a single pass, no trie to build
        if not isinstance(spec, OverlaySpec) and is_within(path, spec.where):
            if best is None or len(spec.where) > len(best.where):
                best = spec
    return best


def plan(config: Config) -> tuple[list[Step], list[Problem]]:
    """Order CONFIG's mounts; return the steps and the problems found while planning."""
    holders = Holders(s.where for s in config.mounts)
    overlay = config.overlay
    problems: list[Problem] = []
    deps: dict[str, set[str]] = {}
    for spec in config.mounts:
        after = set()
        parent = holders.holder(spec.where, strict=True)
        if parent:
            after.add(parent)
        if isinstance(spec, OverlaySpec):
            for path in (spec.lower, spec.rw):
                holder = holders.holder(path)
                if holder:
                    after.add(holder)
            # A mount on or beneath RW (RW/store, RW/work…) must be there before the overlay
            # takes its layers from RW, not mounted over them afterwards.
            after.update(s.where for s in config.mounts if is_within(s.where, spec.rw))
        deps[spec.where] = after

    if overlay is not None:
        problems.extend(check_overlay_layers(overlay, config.mounts))
    problems.extend(_duplicate_tags(config.mounts))
    # A refused spec is left out; the steps that need it are skipped when executed.
    refused = {p.spec for p in problems}

    order = in_rounds(deps)
    by_where = {s.where: s for s in config.mounts}
    # Only a mount that *is* the lower layer is treated as the immutable store (read-only,
    # cached); a share that merely contains it keeps its own defaults.
    lower_where = overlay.lower if overlay else None
    steps = [
        Step(
            by_where[w],
            tuple(sorted(deps[w])),
            store_lower=lower_where == w,
        )
        for w in order
        if by_where[w].source not in refused
    ]
    return steps, problems


def in_rounds(deps: dict[str, set[str]]) -> list[str]:
    """DEPS' keys in rounds: each round takes, shallowest path first, every key whose
    dependencies are all taken. (Not graphlib: its import, with `types`, costs a boot
    12 ms of an emulated guest's instructions.) Keys on a cycle come last, in path
    order: the runner skips a step whose dependencies are not in place."""
    waiting = {w: len(after) for w, after in deps.items()}
    needed_by: dict[str, list[str]] = {}
    for w, after in deps.items():
        for dep in after:
            needed_by.setdefault(dep, []).append(w)
    order: list[str] = []
    ready = [w for w, n in waiting.items() if not n]
    while ready:
        ready.sort(key=_depth_then_path)
        order += ready
        taken, ready = ready, []
        for dep in taken:
            del waiting[dep]
            for w in needed_by.get(dep, ()):
                waiting[w] -= 1
                if not waiting[w]:
                    ready.append(w)
    return order + sorted(waiting, key=_depth_then_path)


def _depth_then_path(where: str) -> tuple[int, str]:
    return where.count("/"), where


def order_by_resolved(steps: list[Step], resolved: Mapping[str, str]) -> list[Step]:
    """Re-order planned STEPS by where their WHEREs resolve inside the root now.

    The plan orders WHEREs as written; a symlink in the root can put them elsewhere
    (`/home -> var/home`: `/home/alice` really lands beneath `/var/home`, and mounted
    first it would be hidden by `/var/home`). RESOLVED maps a step's written WHERE to
    the in-root path it resolves to (chroot semantics); a WHERE missing from it is
    taken as written. A step whose resolved target lies strictly beneath another
    step's runs after the one with the deepest such target, which is added to its
    `after` (so it is skipped if that one fails). Plan order is kept otherwise: a step
    held back runs right after what it waits for, followed by the steps held back
    behind it (a step also waits for its `after`, which may have been held back).

    - Two steps resolving to the same path are not beneath one another: they keep
      their plan order, and the steps beneath that path wait for the first of them
      (the executor then finds the first mounted there when it comes to the second).
    - A target resolving to `/` is no one's parent: nothing is mounted on the root.
    - When a written parent resolves beneath its own child (a symlink pointing back
      up), no order satisfies both: such steps, and the steps waiting for them, go
      last in plan order, where each finds a step it needs not mounted and is skipped.

    O(n·depth): the resolved targets go into a trie.
    """
    n = len(steps)
    targets = [_normal(resolved.get(s.where, s.where)) for s in steps]
    holders = Holders()
    first_at: dict[str, int] = {}
    for i, target in enumerate(targets):
        if target != "/":
            holders.add(target)
            first_at.setdefault(target, i)
    index = {s.where: i for i, s in enumerate(steps)}
    new = list(steps)
    deps: list[set[int]] = []
    for i, step in enumerate(steps):
        needs = {index[d] for d in step.after if d in index}
        parent = holders.holder(targets[i], strict=True)
        if parent is not None:
            p = first_at[parent]
            needs.add(p)
            if steps[p].where not in step.after:
                new[i] = step._replace(after=tuple(sorted((*step.after, steps[p].where))))
        needs.discard(i)
        deps.append(needs)

    emitted = [False] * n
    remaining = [0] * n
    waiters: list[list[int]] = [[] for _ in range(n)]
    order: list[Step] = []
    for i in range(n):
        pending = [d for d in deps[i] if not emitted[d]]
        if pending:
            remaining[i] = len(pending)
            for d in pending:
                waiters[d].append(i)
            continue
        stack = [i]
        while stack:
            j = stack.pop()
            emitted[j] = True
            order.append(new[j])
            released = []
            for w in waiters[j]:  # in plan order
                remaining[w] -= 1
                if remaining[w] == 0:
                    released.append(w)
            stack.extend(reversed(released))
    order.extend(new[i] for i in range(n) if not emitted[i])
    return order


def _normal(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def check_overlay_layers(overlay: OverlaySpec, specs: Iterable[MountSpec]) -> list[Problem]:
    """Refuse, before anything is mounted, an upper layer that cannot work."""
    specs = tuple(specs)
    for path in (overlay.rw, overlay.upper):  # something may be mounted on RW/store itself
        holder = owner_of(path, specs)
        if isinstance(holder, ShareSpec) and holder.proto == "9p":
            return [upper_on_9p(overlay, holder.source)]
    return []


def upper_on_9p(overlay: OverlaySpec, what: str) -> Problem:
    return Problem(
        overlay.source,
        f"the upper layer {overlay.rw} is on 9p ({what}): overlayfs cannot keep whiteouts on 9p, "
        "so every delete or rename of a store path would fail later",
        "put RW on a block volume (microvm.volume=) or a virtiofs share",
    )


def _duplicate_tags(specs: Iterable[MountSpec]) -> list[Problem]:
    seen: dict[str, ShareSpec] = {}
    problems = []
    for spec in specs:
        if not isinstance(spec, ShareSpec):
            continue
        first = seen.setdefault(spec.tag, spec)
        if first is not spec and "9p" in (spec.proto, first.proto):
            problems.append(
                Problem(
                    spec.source,
                    f"tag {spec.tag!r} is already mounted at {first.where} by {first.source}: "
                    "a 9p channel mounts once",
                    "bind-mount a subdirectory instead, or export a second tag",
                )
            )
    return problems
