"""Work on a dependency graph, several items at once.

Each item starts once everything it needs has finished well (or, for an optional
need, finished), on at most WORKERS threads; an item whose need failed is not
started. guest_agent.kmod.loader hands independent kernel modules to the kernel this way
on a guest with more than one CPU: a module load is the kernel's CPU work
(relocation, signature check, the module's init), and the system call releases
the GIL.
"""

from __future__ import annotations

# The C modules beneath threading and queue: those two import collections, functools
# and more, ≈ 5 ms on a host and ten times that in an emulated guest's first run.
from _queue import SimpleQueue
from _thread import start_new_thread
from graphlib import TopologicalSorter

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping, Sequence


def run_graph(
    graph: Mapping[str, Sequence[str]],
    work: Callable[[str], bool],
    workers: int,
    optional: Collection[str] = (),
    cost: Mapping[str, float] | None = None,
) -> set[str]:
    """WORK(item) for each item of GRAPH (item → the items it needs first) whose needs
    all succeeded, at most WORKERS at a time; the items whose WORK returned True. A need
    that is not an item of GRAPH counts as met, and so does one in OPTIONAL once it has
    run, whatever came of it (it is only wanted first). Of the items ready, the one
    heading the costliest chain of work goes first (COST: each item's, default 1).
    graphlib.CycleError for a cycle."""
    needs = {item: [n for n in wanted if n in graph] for item, wanted in graph.items()}
    chain = _chain_costs(needs, TopologicalSorter(needs).static_order(), cost or {})
    sorter = TopologicalSorter(needs)
    sorter.prepare()
    finished: SimpleQueue[tuple[str, bool]] = SimpleQueue()
    succeeded: set[str] = set()
    failed: set[str] = set()
    ready: list[str] = []
    running = 0

    def run(item: str) -> None:
        try:
            ok = work(item)
        except Exception:  # WORK reports its own errors; here it only counts as failed
            ok = False
        finished.put((item, ok))

    while sorter.is_active():
        ready.extend(sorter.get_ready())
        ready.sort(key=chain.__getitem__)
        while ready and running < workers:
            item = ready.pop()
            if any(n in failed for n in needs[item]):
                failed.add(item)
                sorter.done(item)  # its dependants become ready, and are skipped too
                continue
            start_new_thread(run, (item,))
            running += 1
        if running:
            item, ok = finished.get()
            running -= 1
            if ok:
                succeeded.add(item)
            elif item not in optional:
                failed.add(item)
            sorter.done(item)
    return succeeded


def _chain_costs(
    needs: Mapping[str, Sequence[str]], order: Iterable[str], cost: Mapping[str, float]
) -> dict[str, float]:
    """Each item's cost plus that of the costliest chain of items waiting on it
    (ORDER: needs before the items needing them)."""
    chain: dict[str, float] = {}
    for item in reversed(list(order)):  # dependants first
        chain.setdefault(item, 0.0)
        chain[item] += cost.get(item, 1.0)
        for need in needs[item]:
            chain[need] = max(chain.get(need, 0.0), chain[item])
    return chain
