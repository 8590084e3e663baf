"""Task runners: one asyncio task per assigned task, driving it through the runtime.

The lifecycle is SwarmKit's, one step at a time: pull → create → start → wait → (restart with
backoff per the policy) and, when the assignment goes away, stop → remove. Each runner reports
every state change through ``report`` (the session forwards it to the controller). A runner can
also *adopt* a container found running after an agent restart: it skips straight to ``wait`` so
the container is not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from berth.agent.runtime import (
    ContainerRecord,
    ContainerRuntime,
    ContainerSpec,
    ExitStatus,
    ImageInfo,
    ImagePullError,
    PortBinding,
    RunningContainer,
    RuntimeFailure,
)
from berth.proto.berth.v1 import types_pb2 as pb

log = logging.getLogger(__name__)

Report = Callable[[pb.TaskStatus], None]
PullObserver = Callable[[float], None]  # seconds one successful image pull took


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential restart/retry delay, reset once a container has run for ``reset_after``."""

    initial: float = 0.2
    maximum: float = 10.0
    reset_after: float = 10.0

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * (2 ** max(0, attempt - 1))))


RETRY_BACKOFF = Backoff(initial=1.0, maximum=30.0)  # image pulls and container creation


def container_spec(task: pb.Task, node_name: str) -> ContainerSpec:
    spec = task.spec
    return ContainerSpec(
        task_id=task.id,
        service=task.service,
        slot=task.slot,
        node_name=node_name,
        image=spec.image,
        # an empty upb map still costs a Python-level key walk to copy: skip it
        args=tuple(spec.args) if spec.args else (),
        env=dict(spec.env) if spec.env else {},
        cpu_millis=spec.resources.cpu_millis,
        memory_bytes=spec.resources.memory_bytes,
        pids_limit=spec.pids_limit or 512,
        network="host" if spec.network == pb.NETWORK_MODE_HOST else "bridge",
        at_most_one=spec.on_disconnect == pb.ON_DISCONNECT_STOP,
        ports=tuple(
            PortBinding(container_port=p.container_port, host_port=p.host_port, protocol=p.protocol or "tcp")  # type: ignore[arg-type]
            for p in task.ports
        ),
    )


async def stop_and_remove(runtime: ContainerRuntime, task_id: str, grace: float) -> str:
    """Stop a container (SIGTERM, SIGKILL after ``grace``) and remove everything it had; "" once
    nothing of it runs, else why it may: the removal kills what a failed stop left, so only both
    failing leaves that doubt."""
    error = ""
    try:
        await runtime.stop(task_id, grace)
    except RuntimeFailure as exc:
        log.warning("stop failed task=%s: %s", task_id, exc)
        error = f"stop failed: {exc.reason}"
    try:
        await runtime.remove(task_id)
        error = ""
    except RuntimeFailure as exc:
        log.error("remove failed task=%s: %s", task_id, exc)
    return error


def should_restart(policy: int, status: ExitStatus) -> bool:
    if policy == pb.RESTART_POLICY_NEVER:
        return False
    if policy == pb.RESTART_POLICY_ON_FAILURE:
        return status.oom_killed or status.exit_code != 0
    return True  # ALWAYS (the default)


class TaskRunner:
    def __init__(
        self,
        task: pb.Task,
        *,
        runtime: ContainerRuntime,
        node_id: str,
        node_name: str,
        report: Report,
        adopt: ContainerRecord | None = None,
        backoff: Backoff = Backoff(),
        on_pull: PullObserver | None = None,
    ) -> None:
        self.task = task
        self.runtime = runtime
        self.node_id = node_id
        self.node_name = node_name
        self.report_fn = report
        self.adopt = adopt
        self.backoff = backoff
        self.on_pull = on_pull
        self.status = pb.TaskStatus(task_id=task.id, node_id=node_id, state=pb.TASK_STATE_ASSIGNED)
        self._main: asyncio.Task[None] | None = None

    # -- reporting -----------------------------------------------------------------------

    def _report(
        self, state: pb.TaskState.ValueType, message: str = "", *, error: str = "", **fields: object
    ) -> None:
        status = pb.TaskStatus()
        status.CopyFrom(self.status)
        status.state = state
        status.message = message
        status.error = error
        for name, value in fields.items():
            setattr(status, name, value)
        status.updated_at = time.time()
        self.status = status
        if log.isEnabledFor(logging.INFO):  # the state's name is looked up only when it is logged
            name = pb.TaskState.Name(state)
            log.info("task state task=%s state=%s message=%s", self.task.id, name, message or error)
        self.report_fn(status)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"task-{self.task.id}")

    async def shutdown(self, grace: float = 10.0) -> bool:
        """Stop the container (SIGTERM, SIGKILL after ``grace``) and remove everything it had.
        True (and SHUTDOWN reported) once it no longer runs; False (and FAILED reported) when
        neither the stop nor the removal (which kills what is left) could make sure of it: a
        stop-first successor starts on a SHUTDOWN report, so it is never sent on a guess."""
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._main
        error = await stop_and_remove(self.runtime, self.task.id, grace)
        if not error:
            self._report(pb.TASK_STATE_SHUTDOWN, "stopped and removed")
        else:
            self._report(pb.TASK_STATE_FAILED, "it may still run", error=error)
        return not error

    async def _run(self) -> None:
        if self.adopt is not None and self.adopt.running is not None:
            running = self.adopt.running
            self.status.restarts = 0
            self._report(
                pb.TASK_STATE_RUNNING,
                "re-adopted after agent restart",
                pid=running.pid,
                container_ip=running.ip,
                started_at=running.started_at,
                image_digest=running.image_digest,
            )
            await self._supervise(running)
            return
        if self.adopt is not None:  # created earlier but not running: start it again
            await self._supervise(None)
            return
        image = await self._pull()
        await self._create(image)
        await self._supervise(None)

    async def _pull(self) -> ImageInfo:
        attempt = 0
        while True:
            attempt += 1
            self._report(pb.TASK_STATE_PREPARING, f"pulling image {self.task.spec.image}")
            began = time.monotonic()
            try:
                image = await self.runtime.pull(self.task.spec.image)
            except ImagePullError as exc:
                delay = RETRY_BACKOFF.delay(attempt)
                self._report(
                    pb.TASK_STATE_REJECTED,
                    f"retrying in {delay:.0f}s",
                    error=f"image pull failed: {exc.reason}",
                )
                await asyncio.sleep(delay)
                continue
            if self.on_pull is not None:
                self.on_pull(time.monotonic() - began)
            return image

    async def _create(self, image: ImageInfo) -> None:
        attempt = 0
        spec = container_spec(self.task, self.node_name)
        while True:
            attempt += 1
            self._report(pb.TASK_STATE_PREPARING, "creating container", image_digest=image.digest)
            try:
                await self.runtime.create(spec, image)
                return
            except RuntimeFailure as exc:
                with contextlib.suppress(RuntimeFailure):
                    await self.runtime.remove(self.task.id)
                delay = RETRY_BACKOFF.delay(attempt)
                self._report(
                    pb.TASK_STATE_REJECTED, f"retrying in {delay:.0f}s", error=f"create failed: {exc.reason}"
                )
                await asyncio.sleep(delay)

    async def _supervise(self, running: RunningContainer | None) -> None:
        failures = 0
        last_exit = ""
        policy = self.task.spec.restart
        while True:
            if running is None:
                self._report(pb.TASK_STATE_STARTING, "starting container")
                try:
                    running = await self.runtime.start(self.task.id)
                except RuntimeFailure as exc:
                    failures += 1
                    delay = self.backoff.delay(failures)
                    self._report(
                        pb.TASK_STATE_FAILED,
                        f"restarting in {delay:.1f}s",
                        error=f"start failed: {exc.reason}",
                    )
                    await asyncio.sleep(delay)
                    continue
                self._report(
                    pb.TASK_STATE_RUNNING,
                    f"restarted after: {last_exit}" if last_exit else "",
                    pid=running.pid,
                    container_ip=running.ip,
                    started_at=running.started_at,
                    image_digest=running.image_digest,
                )
            exit_status = await self.runtime.wait(self.task.id)
            ran_for = time.time() - running.started_at
            running = None
            if ran_for >= self.backoff.reset_after:
                failures = 0
            failures += 1
            description = exit_status.describe()
            last_exit = description
            if not should_restart(policy, exit_status):
                final = pb.TASK_STATE_COMPLETE if exit_status.exit_code == 0 else pb.TASK_STATE_FAILED
                self._report(final, description, exit_code=exit_status.exit_code or 0, pid=0)
                return
            delay = self.backoff.delay(failures)
            self.status.restarts += 1
            self._report(
                pb.TASK_STATE_FAILED,
                f"{description}; restarting in {delay:.1f}s",
                error=description,
                exit_code=exit_status.exit_code if exit_status.exit_code is not None else -1,
                pid=0,
            )
            await asyncio.sleep(delay)


def _at_most_one(task: pb.Task) -> bool:
    return task.spec.on_disconnect == pb.ON_DISCONNECT_STOP


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # seen, so never logged as "never retrieved"


class TaskManager:
    """Holds the runners; applies full and incremental assignments from the controller."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        *,
        node_id: str,
        node_name: str,
        report: Report,
        on_pull: PullObserver | None = None,
    ) -> None:
        self.runtime = runtime
        self.on_pull = on_pull
        self.node_id = node_id
        self.node_name = node_name
        self.report = report
        self.runners: dict[str, TaskRunner] = {}
        self._found: dict[str, ContainerRecord] = {}
        self._stopping: set[asyncio.Task[bool]] = set()
        self._stops: dict[str, asyncio.Task[bool]] = {}  # task id -> its stop under way
        self._at_most_one_stops: set[str] = set()  # of those, tasks of at-most-one services
        self._unstopped: dict[str, tuple[int, bool]] = {}  # a stop failed: (attempts, at-most-one)
        self._start_after_stop: dict[str, pb.Task] = {}  # wanted again while its stop ends
        self._closed = False  # the agent is shutting down: start nothing, try no stop again
        self._report_stopped_for: set[str] = set()  # SHUTDOWN to report when the stop succeeds

    async def recover(self) -> list[pb.TaskStatus]:
        """Find containers left by an earlier agent process; they keep running until the first
        full assignment says whether they are still wanted."""
        records = await self.runtime.list()
        self._found = {r.spec.task_id: r for r in records}
        statuses = []
        for r in records:
            if r.running is not None:
                statuses.append(
                    pb.TaskStatus(
                        task_id=r.spec.task_id,
                        node_id=self.node_id,
                        state=pb.TASK_STATE_RUNNING,
                        pid=r.running.pid,
                        container_ip=r.running.ip,
                        started_at=r.running.started_at,
                        image_digest=r.running.image_digest,
                    )
                )
        log.info("recovered containers=%d running=%d", len(records), len(statuses))
        return statuses

    def statuses(self) -> list[pb.TaskStatus]:
        return [r.status for r in self.runners.values()]

    def apply(self, tasks: Iterable[pb.Task], removed: Iterable[str], *, full: bool) -> None:
        """Converge on the assignment. A task with desired state SHUTDOWN (an at-most-one task
        moving stop first) is stopped and reported SHUTDOWN once it is: the controller starts its
        successor only then, and sends it again (every full assignment does) until it hears so,
        so a report lost to a reconnect or a restart on either side is made again."""
        wanted = {t.id: t for t in tasks}
        doomed = set(removed)
        if full:
            doomed |= set(self.runners) - set(wanted)
            leftovers = set(self._found) - set(wanted)
            for task_id in leftovers:
                self._remove_orphan(task_id)
        if full:
            doomed |= set(self._start_after_stop) - set(wanted)
        for task_id in doomed:
            self._start_after_stop.pop(task_id, None)
            runner = self.runners.pop(task_id, None)
            if runner is not None:
                self._background(
                    runner.shutdown(), task_id, at_most_one=_at_most_one(runner.task), reports=True
                )
        for task_id, task in wanted.items():
            if task.desired_state == pb.TASK_STATE_SHUTDOWN:
                self._stop_for_good(task)
                continue
            if task_id in self.runners:
                continue
            if task_id in self._stops:
                # still stopping (a watchdog stop, say, and the controller wants it back): its
                # removal would take the new container with it; start it once that stop ends
                self._start_after_stop[task_id] = task
                continue
            self._start(task)

    def _start(self, task: pb.Task) -> None:
        task_id = task.id
        runner = TaskRunner(
            task,
            runtime=self.runtime,
            node_id=self.node_id,
            node_name=self.node_name,
            report=self.report,
            adopt=self._found.pop(task_id, None),
            on_pull=self.on_pull,
        )
        self.runners[task_id] = runner
        runner.start()

    async def stop_on_disconnect(self, grace: float = 1.0) -> int:
        """Cut off from the controller: stop and remove the containers of at-most-one services
        now (short grace: the controller starts their replacements after deadline + margin),
        and cut short the stops of such containers already under way (a stop-first move asks
        for the full grace, which the margin does not cover)."""
        doomed = [r for r in self.runners.values() if _at_most_one(r.task)]
        # containers recovered after an agent restart, not yet claimed by an assignment
        found = [tid for tid, record in self._found.items() if record.spec.at_most_one]
        under_way = [tid for tid in self._at_most_one_stops if tid in self._stops]
        stuck = [tid for tid, (_, amo) in self._unstopped.items() if amo and tid not in self._stops]
        hurried = [self._stops[tid] for tid in under_way]
        # a start waiting for a stop to end would come after this: cut off, it must not
        for task_id, task in list(self._start_after_stop.items()):
            if _at_most_one(task):
                del self._start_after_stop[task_id]
        # a second stop with the short grace kills what the first one still waits on
        kills = [asyncio.ensure_future(self.runtime.stop(tid, grace)) for tid in (*under_way, *stuck)]
        for kill in kills:  # their outcome shows in the stops they cut short, or in the next try
            kill.add_done_callback(_retrieved)
        for runner in doomed:
            self.runners.pop(runner.task.id, None)
            self._background(runner.shutdown(grace), runner.task.id, at_most_one=True, reports=True)
        for task_id in found:
            self._found.pop(task_id, None)
            self._background(self._remove_found(task_id, grace), task_id, at_most_one=True)
        stops = [self._stops[tid] for tid in (*(r.task.id for r in doomed), *found)]
        waits: list[asyncio.Future[Any]] = [*kills, *stops, *hurried]
        if waits:
            # every stop is under way now; wait a little (the watchdog logs what it stopped), never
            # long and never cancelling: runc waits up to 10 s more after SIGKILL, and the watchdog
            # must be back to act on the next cut-off
            await asyncio.wait(waits, timeout=grace + 1.0)
        return len(doomed) + len(found) + len(hurried)

    def _stop_for_good(self, task: pb.Task) -> None:
        """Stop a task the controller wants stopped, and report SHUTDOWN once nothing of it runs:
        right away if nothing does (it was stopped before, or never started here); never while a
        stop is under way or after one failed (the container may still run)."""
        self._start_after_stop.pop(task.id, None)
        self._report_stopped_for.add(task.id)  # by whichever stop of it succeeds (once)
        runner = self.runners.pop(task.id, None)
        if runner is not None:  # (after any stop under way: one stop of a task at a time)
            self._background(runner.shutdown(), task.id, at_most_one=_at_most_one(task), reports=True)
        elif task.id in self._stops:
            pass  # under way: its end reports
        elif task.id in self._found or task.id in self._unstopped:
            self._found.pop(task.id, None)
            self._background(self._remove_found(task.id), task.id, at_most_one=_at_most_one(task))
        else:
            self._report_stopped_for.discard(task.id)
            self._report_stopped(task.id, "not running")

    def _report_stopped(self, task_id: str, message: str) -> None:
        self.report(
            pb.TaskStatus(
                task_id=task_id,
                node_id=self.node_id,
                state=pb.TASK_STATE_SHUTDOWN,
                message=message,
                updated_at=time.time(),
            )
        )

    def _remove_orphan(self, task_id: str) -> None:
        self._found.pop(task_id, None)
        self._background(self._remove_found(task_id), task_id, at_most_one=False)

    async def _remove_found(self, task_id: str, grace: float = 10.0) -> bool:
        """Stop and remove a container no runner holds; True once it no longer runs."""
        log.info("removing container no longer assigned task=%s", task_id)
        return not await stop_and_remove(self.runtime, task_id, grace)

    def _background(
        self, stop: Coroutine[Any, Any, bool], task_id: str, *, at_most_one: bool, reports: bool = False
    ) -> None:
        """Run a stop; remember it under its task id until it ends, and what it ended in.
        ``reports``: the stop reports its own outcome (a runner's shutdown)."""
        previous = self._stops.get(task_id)
        task = asyncio.create_task(self._after(previous, stop))
        self._stopping.add(task)
        self._stops[task_id] = task
        if at_most_one:
            self._at_most_one_stops.add(task_id)

        def done(finished: asyncio.Task[bool]) -> None:
            self._stopping.discard(finished)
            if self._stops.get(task_id) is not finished:
                return  # a later stop of the same task took over; it reports
            del self._stops[task_id]
            self._at_most_one_stops.discard(task_id)
            stopped = not finished.cancelled() and finished.exception() is None and finished.result()
            if stopped:
                self._unstopped.pop(task_id, None)
                if task_id in self._report_stopped_for:
                    self._report_stopped_for.discard(task_id)
                    if not reports:
                        self._report_stopped(task_id, "stopped and removed")
            else:
                # it may still run: tried again by itself, with backoff, whoever asks or not (and
                # reported stopped then, if that was asked for)
                attempts = self._unstopped.get(task_id, (0, at_most_one))[0] + 1
                self._unstopped[task_id] = (attempts, at_most_one)
                delay = RETRY_BACKOFF.delay(attempts)
                asyncio.get_running_loop().call_later(delay, self._stop_again, task_id)
            if stopped and not self._closed:  # (after a failed stop it waits for a retry that works)
                wanted = self._start_after_stop.pop(task_id, None)
                if wanted is not None and task_id not in self.runners:
                    self._start(wanted)

        task.add_done_callback(done)

    def _stop_again(self, task_id: str) -> None:
        """Try a failed stop again, unless it was tried since or the task runs here again."""
        found = self._unstopped.get(task_id)
        if self._closed or found is None or task_id in self._stops or task_id in self.runners:
            return
        self._background(self._remove_found(task_id), task_id, at_most_one=found[1])

    @staticmethod
    async def _after(previous: asyncio.Task[bool] | None, stop: Coroutine[Any, Any, bool]) -> bool:
        if previous is not None:  # one stop of a task at a time, in order
            try:
                await asyncio.shield(previous)
            except asyncio.CancelledError:
                if not previous.done():  # this stop was cancelled, not the one before it
                    stop.close()
                    raise
            except Exception:  # the earlier stop's outcome is its own to report
                pass
        return await stop

    async def close(self) -> None:
        """Agent shutdown: stop supervising but leave containers running (they are re-adopted)."""
        self._closed = True
        for runner in self.runners.values():
            if runner._main is not None:
                runner._main.cancel()
        for task in list(self._stopping):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
