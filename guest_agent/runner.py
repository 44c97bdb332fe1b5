"""Running a plan: each step by its kind's handler, present devices first, then the waits.

Steps run in plan order, re-ordered by where their mount points resolve in the
root now. A step whose device is not there yet is put off with every step below
it, so one slow or missing device holds up nothing else. A handler's `Failure`
becomes a `Problem` of its spec and the other steps go on; a step whose parent
is not mounted is skipped, never mounted onto the wrong filesystem. At the end,
a mount this run made that a later one hides is reported.
"""

from __future__ import annotations

import os
import posixpath
import stat

from guest_agent.handlers import handler_for, named_filesystems
from guest_agent.kernel.mountinfo import in_root
from guest_agent.kernel.paths import PathError, host_path, resolve_as_far_as_exists
from guest_agent.plan import order_by_resolved
from guest_agent.results import NOAUTO, Failure, Result, Status
from guest_agent.spec import Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.handlers.base import Context, Handler
    from guest_agent.plan import Step
    from guest_agent.spec import MountSpec


class Runner:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.results: list[Result] = []
        self.noauto: set[str] = set()  # the WHEREs left unmounted for noauto

    def run(self, steps: list[Step]) -> list[Result]:
        """Mount what is there first, then wait for the rest (in plan order both times)."""
        steps = self._by_resolved_target(steps)
        for step in steps:
            self.ctx.devices.named_filesystems.update(named_filesystems(step.spec))
        later: list[Step] = []
        put_off: set[str] = set()
        for step in steps:
            if step.spec.options.noauto:
                self._not_auto(step)
                continue
            if not any(d in put_off for d in step.after):
                handler = handler_for(step.spec)  # made once, for both questions
                if self._present(handler):
                    self.run_step(step, handler)
                    continue
            later.append(step)
            put_off.add(step.where)
        for step in later:
            self.run_step(step)
        self._check_hidden()
        return self.results

    def _not_auto(self, step: Step) -> None:
        """noauto: listed, not mounted (systemd's meaning: not mounted at boot)."""
        spec = step.spec
        self.noauto.add(spec.where)
        self.results.append(Result(spec.where, spec.source, Status.SKIPPED, message=NOAUTO))
        self.ctx.reporter.info(f"{spec.source}: {NOAUTO}")

    def _by_resolved_target(self, steps: list[Step]) -> list[Step]:
        """Order mounts by where their mount points resolve inside the root now (a symlink
        such as /home -> var/home puts /home/alice beneath /var/home), not as written.

        Mount points with no symbolic link on the way resolve as written: when none
        has one (the usual boot), the plan stands without walking each of them."""
        seen: dict[str, bool] = {}
        if not any(self._may_move(step.where, seen) for step in steps):
            return steps
        root_fd = self.ctx.root_fd()
        resolved = {}
        for step in steps:
            try:
                resolved[step.where] = resolve_as_far_as_exists(root_fd, step.where)
            except PathError:
                continue  # its own step reports the problem
        if all(resolved.get(s.where, s.where) == s.where for s in steps):
            return steps
        return order_by_resolved(steps, resolved)

    def _may_move(self, where: str, seen: dict[str, bool]) -> bool:
        """Whether WHERE may resolve elsewhere than written: it is not normalised, or a
        symbolic link (or what lstat cannot look at) is on its existing part. SEEN caches
        each prefix's answer (True: a link or unknown; False: a directory)."""
        if posixpath.normpath(where) != where:
            return True
        prefix = ""
        for name in where.split("/")[1:]:
            prefix += "/" + name
            moved = seen.get(prefix)
            if moved is None:
                try:
                    mode = os.lstat(host_path(self.ctx.root, prefix)).st_mode
                except FileNotFoundError:
                    return False  # the rest is taken as written
                except OSError:
                    mode = None  # let the walk tell
                if mode is not None and not stat.S_ISDIR(mode) and not stat.S_ISLNK(mode):
                    return False  # not a directory: the step itself reports it
                moved = seen[prefix] = mode is None or stat.S_ISLNK(mode)
            if moved:
                return True
        return False

    def _present(self, handler: Handler[MountSpec]) -> bool:
        """Whether HANDLER's tag or disk can be used right now (no waiting)."""
        if self.ctx.dry_run:
            return True
        try:
            return handler.present(self.ctx)
        except Failure:
            return True  # run it now: its own step reports the problem

    def run_step(self, step: Step, handler: Handler[MountSpec] | None = None) -> None:
        """Run STEP by HANDLER (made for STEP's spec when not given)."""
        ctx, spec = self.ctx, step.spec
        nofail = spec.options.nofail
        missing = [d for d in step.after if not ctx.log.in_place(d)]
        if missing:
            why = "noauto" if missing[0] in self.noauto else "not"
            reason = f"not mounted: it needs {missing[0]} mounted first, which is {why}"
            self.results.append(Result(spec.where, spec.source, Status.SKIPPED, message=reason))
            ctx.reporter.problem(Problem(spec.source, reason, fatal=not nofail))
            return
        if handler is None:
            handler = handler_for(spec)
        lower = step.store_lower
        try:
            result = handler.dry_run(ctx, lower) if ctx.dry_run else handler.mount(ctx, lower)
        except (Failure, PathError, OSError) as e:
            hint = e.hint if isinstance(e, Failure) else None
            if isinstance(e, Failure):
                reason = e.reason
            elif isinstance(e, OSError):  # an I/O error we did not foresee: still one line
                reason = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
            else:
                reason = str(e)
            self.results.append(Result(spec.where, spec.source, Status.FAILED, message=reason))
            ctx.reporter.problem(Problem(spec.source, reason, hint, fatal=not nofail))
            return
        self.results.append(result)
        if result.status in Status.IN_PLACE:
            ctx.log.add_where(spec.where)
        host = ctx.log.last_host()
        if result.status == Status.MOUNTED and host is not None:
            ctx.log.place(spec, host)

    def _check_hidden(self) -> None:
        """Each mount this run made must still be visible: one a later mount covers (over
        its mount point or an ancestor) is reported, as a failure of its spec."""
        placed = self.ctx.log.placed()
        if not placed:
            return
        table = self.ctx.table()
        for spec, host in placed:
            mine = table.at(host)
            cover = table.hidden_by(mine) if mine is not None else None
            if cover is None:
                continue
            reason = (
                f"mounted at {spec.where}, but hidden by {cover.fstype} {cover.source}"
                f" mounted at {in_root(self.ctx.root, cover.mount_point)} after it"
            )
            self.results.append(Result(spec.where, spec.source, Status.FAILED, message=reason))
            self.ctx.reporter.problem(
                Problem(
                    spec.source,
                    reason,
                    "check the symbolic links on the way to it",
                    fatal=not spec.options.nofail,
                )
            )
