"""The store interface against a real etcd: layout, codec, guarded batched writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import pytest

from berth.controller.cluster import Cluster
from berth.controller.store import MAX_TXN_OPS, ConflictError, Delete, Loaded, Op, Put, Store, StoreError
from berth.proto.berth.v1 import types_pb2 as pb
from berth.proto.berth.v1.agent_pb2 import Assignments
from tests.integration.etcd_server import etcd_server, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd") / "data") as url:
        yield url


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class LostReply(Store):
    """The real store, except that the reply of its next ``lose`` transactions is lost after
    etcd committed them (as on a timeout or a dropped connection)."""

    lose = 0

    async def _commit_batch(self, batch: Sequence[Op]) -> int:
        revision = await super()._commit_batch(batch)
        if self.lose:
            self.lose -= 1
            raise StoreError(f"etcd at {self.endpoint} failed a write (deadline exceeded)")
        return revision


class Unreadable(LostReply):
    """... and whose reads fail while ``unreadable`` is set."""

    unreadable = False

    async def load(self) -> Loaded:
        if self.unreadable:
            raise StoreError(f"etcd at {self.endpoint} is unreachable")
        return await super().load()


def test_roundtrip_and_layout(etcd: str) -> None:
    async def go() -> None:
        store = Store(etcd, "/rt/")
        svc = pb.Service(spec=pb.ServiceSpec(name="web", image="i", replicas=2), generation=1)
        node = pb.Node(id="n1", name="h1", capacity=pb.Resources(cpu_millis=2000))
        revs = await store.commit(
            [Put(store.keys.service("web"), svc, 0), Put(store.keys.node("n1"), node, 0)]
        )
        loaded = await store.load()
        assert loaded.services["web"].value == svc
        assert loaded.nodes["n1"].value == node
        assert loaded.services["web"].mod_revision == revs[store.keys.service("web")]
        await store.close()

    run(go())


def test_guard_refuses_stale_write_and_writes_nothing(etcd: str) -> None:
    async def go() -> None:
        store = Store(etcd, "/guard/")
        key = store.keys.service("a")
        rev = (await store.commit([Put(key, pb.Service(generation=1), 0)]))[key]
        await store.commit([Put(key, pb.Service(generation=2), rev)])
        other = store.keys.service("b")
        with pytest.raises(ConflictError):  # stale guard on a; b in the same txn must not be written
            await store.commit(
                [Put(other, pb.Service(generation=9), 0), Put(key, pb.Service(generation=3), rev)]
            )
        loaded = await store.load()
        assert loaded.services["a"].value.generation == 2
        assert "b" not in loaded.services
        with pytest.raises(ConflictError):  # must-not-exist guard
            await store.commit([Put(key, pb.Service(generation=4), 0)])
        await store.commit([Delete(key, loaded.services["a"].mod_revision)])
        assert "a" not in (await store.load()).services
        await store.close()

    run(go())


def test_large_commit_is_batched(etcd: str) -> None:
    async def go() -> None:
        store = Store(etcd, "/batch/")
        ops = [
            Put(store.keys.task("s", i), pb.Task(id=f"s.{i}", slot=i), 0)
            for i in range(1, 3 * MAX_TXN_OPS + 2)
        ]
        revisions = await store.commit(ops)
        assert len(set(revisions.values())) == 4  # four transactions
        assert len((await store.load()).tasks) == len(ops)
        await store.close()

    run(go())


def test_unreachable_etcd_is_a_store_error() -> None:
    async def go() -> None:
        store = Store(f"http://127.0.0.1:{free_port()}", "/x/", timeout=1.0)
        with pytest.raises(StoreError, match="unreachable"):
            await store.ping()
        await store.close()

    run(go())


def test_ping_returns_revision(etcd: str) -> None:
    async def go() -> None:
        store = Store(etcd, "/ping/")
        assert await store.ping() >= 1
        await store.close()

    run(go())


def test_each_committed_batch_is_reported_even_when_a_later_one_fails(etcd: str) -> None:
    """What etcd accepted is handed to the caller batch by batch, so a conflict in one
    transaction of a large commit does not hide the others from the cache."""

    async def go() -> None:
        store = Store(etcd, "/partial/")
        taken = store.keys.task("s", 2 * MAX_TXN_OPS + 1)  # the first key of the third batch
        await store.commit([Put(taken, pb.Task(id="already-there"), 0)])
        ops = [
            Put(store.keys.task("s", i), pb.Task(id=f"s.{i}", slot=i), 0)
            for i in range(1, 4 * MAX_TXN_OPS + 1)
        ]
        reported: dict[str, int] = {}
        batches: list[int] = []

        def on_batch(batch: object, revisions: dict[str, int]) -> None:
            batches.append(len(revisions))
            reported.update(revisions)

        with pytest.raises(ConflictError):
            await store.commit(ops, on_batch=on_batch)
        loaded = await store.load()
        committed = {key for key in loaded.tasks if key != taken}
        assert batches == [MAX_TXN_OPS] * 3  # every transaction but the conflicting one
        assert set(reported) == committed
        assert taken not in reported
        assert all(loaded.tasks[key].mod_revision == rev for key, rev in reported.items())
        await store.close()

    run(go())


class Stalling(Store):
    """The real store, except that the transaction holding ``stall_key`` never returns."""

    stall_key = ""
    committed = 0  # transactions that returned

    async def _commit_batch(self, batch: Sequence[Op]) -> int:
        if any(op.key == self.stall_key for op in batch):
            await asyncio.Event().wait()
        revision = await super()._commit_batch(batch)
        self.committed += 1
        return revision


async def four_node_cluster(
    etcd: str, prefix: str
) -> tuple[Stalling, Cluster, list[tuple[str, Assignments]]]:
    """A controller over a stalling store and four ready nodes, its loops stopped (the tests
    drive ``_commit`` themselves), and the list of what it tells the agents."""
    store = Stalling(etcd, prefix)
    nodes = [pb.Node(id=f"n{i}", name=f"host-{i}", state=pb.NODE_STATE_READY) for i in range(4)]
    await store.commit([Put(store.keys.node(n.id), n, 0) for n in nodes])
    cluster = Cluster(store)
    await cluster.start()
    await cluster.stop()
    sent: list[tuple[str, Assignments]] = []
    cluster.hub.send = lambda node_id, m: sent.append((node_id, m.assignments)) is None  # type: ignore[method-assign]
    return store, cluster, sent


def hundred_per_node(store: Store, service: str) -> list[Op]:
    """400 tasks of ``service``, node by node as a pass writes them (n0's first): four
    transactions."""
    tasks = [pb.Task(id=f"{service}.{i}", slot=i, node_id=f"n{i // 100}") for i in range(400)]
    return [Put(store.keys.task(service, t.slot), t, 0) for t in tasks]


def test_agents_hear_of_a_large_commit_when_it_ends_and_of_what_committed_when_it_fails(
    etcd: str,
) -> None:
    """A commit of many transactions is folded into the cache and told to the agents only when
    it ends (folding would keep etcd waiting, the agents' reaction would slow the rest of it),
    the agents in the order the transactions were folded; when a transaction of it conflicts, or
    the commit is cancelled while one is in flight, every one that committed is still folded
    and told (before the full resend that follows a reload)."""
    from berth.controller.errors import UnavailableError

    async def go() -> None:
        store, cluster, sent = await four_node_cluster(etcd, "/held/")
        fold = cluster._fold
        told_while_folding: list[int] = []
        folded: list[str] = []  # the first task id of each transaction, in the order folded

        def counting_fold(batch: Sequence[Op], revisions: dict[str, int], **kwargs: object) -> None:
            told_while_folding.append(len(sent))
            folded.append(batch[0].value.id)  # type: ignore[union-attr]
            fold(batch, revisions, **kwargs)  # type: ignore[arg-type]

        cluster._fold = counting_fold  # type: ignore[method-assign]

        def ops(service: str) -> list[Op]:
            return hundred_per_node(store, service)

        def first_ids(messages: list[tuple[str, Assignments]]) -> list[str]:
            """The first task id of each message (a transaction's first message is its first task's)."""
            return [a.tasks[0].id for _, a in messages if a.tasks]

        await cluster._commit(ops("web"))
        assert told_while_folding == [0, 0, 0, 0]  # four transactions, nobody told before the end
        assert sorted(n for n, _ in sent) == ["n0", "n1", "n1", "n2", "n2", "n3", "n3"]
        assert sorted(t.id for _, a in sent for t in a.tasks) == sorted(f"web.{i}" for i in range(400))
        assert not any(a.full for _, a in sent)
        # the messages go out in the order their transactions were folded
        assert [i for i in first_ids(sent) if i in folded] == folded

        sent.clear()
        told_while_folding.clear()
        folded.clear()
        taken = store.keys.task("api", 300)  # in the third transaction: it conflicts
        await store.commit([Put(taken, pb.Task(id="already-there"), 0)])
        with pytest.raises(UnavailableError, match="retry"):
            await cluster._commit(ops("api"))
        assert told_while_folding == [0, 0, 0]  # the three that committed, in whatever order
        incremental = [(n, a) for n, a in sent if not a.full]
        assert sent[: len(incremental)] == incremental  # before the full resend
        told = {t.id for _, a in incremental for t in a.tasks}
        assert told == {f"api.{i}" for i in range(400) if not 256 <= i < 384}
        full = {n: {t.id for t in a.tasks} for n, a in sent if a.full}
        assert full["n2"] >= {f"api.{i}" for i in range(200, 256)}  # what committed, as reloaded
        assert not full["n2"] & {f"api.{i}" for i in range(256, 300)}

        sent.clear()
        told_while_folding.clear()
        folded.clear()
        store.stall_key = store.keys.task("jobs", 300)  # the third transaction never returns
        store.committed = 0
        commit = asyncio.create_task(cluster._commit(ops("jobs")))
        while store.committed < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        # still committing: three transactions are in etcd, and neither the cache nor the agents
        # know of them yet
        assert folded == [] and sent == []
        jobs = f"{store.keys.tasks}jobs/"
        assert not any(key.startswith(jobs) for key in cluster.state.tasks)
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        assert sorted(folded) == ["jobs.0", "jobs.128", "jobs.384"]
        in_cache = {s.value.id for key, s in cluster.state.tasks.items() if key.startswith(jobs)}
        told = {t.id for _, a in sent for t in a.tasks}
        assert told == in_cache == {f"jobs.{i}" for i in range(400) if not 256 <= i < 384}
        assert not any(a.full for _, a in sent)
        assert cluster._uncertain  # the stalled transaction may yet commit: the next writer reloads
        await store.close()

    run(go())


def test_folding_a_large_commit_lets_the_event_loop_run_and_a_cancel_there_folds_the_rest(
    etcd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that went through is folded in chunks with the event loop let in between (a
    heartbeat must not wait for 100,000 tasks to be folded); cancelled in between, the rest is
    folded at once and the agents told of all of it. A fold that fails while a commit is being
    cancelled leaves the cache uncertain and the cancellation goes on."""
    from berth.controller import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "FOLD_CHUNK", 1)

    async def go() -> None:
        store, cluster, sent = await four_node_cluster(etcd, "/chunks/")
        fold = cluster._fold
        ticks = 0
        ticks_at_fold: list[int] = []

        def counting_fold(batch: Sequence[Op], revisions: dict[str, int], **kwargs: object) -> None:
            ticks_at_fold.append(ticks)
            fold(batch, revisions, **kwargs)  # type: ignore[arg-type]

        cluster._fold = counting_fold  # type: ignore[method-assign]

        def ops(service: str) -> list[Op]:
            return hundred_per_node(store, service)

        async def cancel_commit_when(service: str, ready: Callable[[], bool]) -> None:
            """Commit ``service``'s tasks, cancel the call once ``ready()``: it must raise the
            cancellation and leave the cache uncertain."""
            commit = asyncio.create_task(cluster._commit(ops(service)))
            while not ready():
                await asyncio.sleep(0)  # (one loop turn: a cancel must land between two folds)
            commit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await commit
            assert cluster._uncertain

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        await cluster._commit(ops("web"))
        assert len(ticks_at_fold) == 4
        assert len(set(ticks_at_fold)) == 4  # the loop ran between every two folds
        assert len({t.id for _, a in sent for t in a.tasks}) == 400

        # cancelled while it lets the loop in after the first fold: the other three are folded
        sent.clear()
        ticks_at_fold.clear()
        await cancel_commit_when("api", lambda: bool(ticks_at_fold))
        assert len(ticks_at_fold) == 4
        assert {t.id for _, a in sent for t in a.tasks} == {f"api.{i}" for i in range(400)}
        assert {s.value.id for key, s in cluster.state.tasks.items() if "/api/" in key} == {
            f"api.{i}" for i in range(400)
        }
        ticking.cancel()

        # a fold that fails while the commit is being cancelled: the cancellation goes on
        await cluster._reload()
        sent.clear()

        def broken_fold(batch: object, revisions: object, **kwargs: object) -> None:
            raise RuntimeError("bug while folding")

        cluster._fold = broken_fold  # type: ignore[method-assign]
        store.stall_key = store.keys.task("jobs", 300)
        store.committed = 0
        await cancel_commit_when("jobs", lambda: store.committed >= 3)

        # and one that fails between two chunks, when a cancel came while the loop was let in
        await cluster._reload()
        store.stall_key = ""

        def first_then_broken(batch: Sequence[Op], revisions: dict[str, int], **kwargs: object) -> None:
            cluster._fold = broken_fold  # type: ignore[method-assign]
            fold(batch, revisions, **kwargs)  # type: ignore[arg-type]

        cluster._fold = first_then_broken  # type: ignore[method-assign]
        await cancel_commit_when("cron", lambda: cluster._fold is not first_then_broken)
        await store.close()

    run(go())


def test_a_failure_applying_a_commit_reloads_and_resyncs_agents(etcd: str) -> None:
    """If folding a committed transaction into the cache fails, the controller starts again from
    etcd and sends every agent the full list of what it must run."""
    from berth.controller.errors import UnavailableError
    from berth.proto.berth.v1 import agent_pb2

    async def go() -> None:
        store = Store(etcd, "/fold/")
        node = pb.Node(id="A", name="host-a", state=pb.NODE_STATE_READY)
        await store.commit([Put(store.keys.node("A"), node, 0)])
        cluster = Cluster(store)
        await cluster.start()
        await cluster.stop()  # the loops are not needed: the test drives _commit itself
        sent: list[tuple[str, agent_pb2.Assignments]] = []
        cluster.hub.send = lambda node_id, m: sent.append((node_id, m.assignments)) is None  # type: ignore[method-assign]

        def broken_fold(batch: object, revisions: object, **kwargs: object) -> None:
            raise RuntimeError("bug while folding")

        cluster._fold = broken_fold  # type: ignore[method-assign]
        task = pb.Task(id="web.1.x", service="web", slot=1, node_id="A")
        key = store.keys.task("web", 1)
        with pytest.raises(UnavailableError, match="reloaded"):
            await cluster._commit([Put(key, task, 0)])
        assert cluster.state.tasks[key].value == task  # committed in etcd, so in the cache again
        assert [(n, a.full, [t.id for t in a.tasks]) for n, a in sent] == [("A", True, ["web.1.x"])]
        await store.close()

    run(go())


def test_a_write_whose_outcome_is_unknown_is_read_back_before_the_next_one(etcd: str) -> None:
    """A transaction that commits while its reply is lost (a timeout, a dropped connection) fails
    the call; the next writer reads etcd again first, so it decides on what really committed and
    the agents hear of it, instead of waiting for a conflict that may never come."""
    from berth.controller.errors import UnavailableError
    from berth.proto.berth.v1 import agent_pb2

    async def go() -> None:
        store = LostReply(etcd, "/lost/")
        node = pb.Node(id="A", name="host-a", state=pb.NODE_STATE_READY)
        await store.commit([Put(store.keys.node("A"), node, 0)])
        cluster = Cluster(store)
        await cluster.start()
        await cluster.stop()  # the loops are not needed: the test drives the writer itself
        sent: list[tuple[str, agent_pb2.Assignments]] = []
        cluster.hub.send = lambda node_id, m: sent.append((node_id, m.assignments)) is None  # type: ignore[method-assign]
        task = pb.Task(id="web.1.x", service="web", slot=1, node_id="A")
        key = store.keys.task("web", 1)
        store.lose = 1
        with pytest.raises(UnavailableError, match="deadline exceeded"):
            await cluster._commit([Put(key, task, 0)])
        assert key not in cluster.state.tasks  # the controller did not hear that it committed
        assert sent == []
        view = await cluster.set_availability("host-a", pb.NODE_AVAILABILITY_PAUSE)  # the next writer
        assert view.tasks == 1  # it saw the task that did commit
        assert cluster.state.tasks[key].value == task
        assert [(n, a.full, [t.id for t in a.tasks]) for n, a in sent] == [("A", True, ["web.1.x"])]
        assert (await store.load()).nodes["A"].value.availability == pb.NODE_AVAILABILITY_PAUSE
        await store.close()

    run(go())


def test_while_etcd_cannot_be_read_back_every_writer_fails_and_changes_nothing(etcd: str) -> None:
    """After a write of unknown outcome, a writer that cannot reload refuses with Unavailable
    (nothing is decided on a view that may be stale) until etcd answers again."""
    from berth.controller.errors import UnavailableError

    async def go() -> None:
        store = Unreadable(etcd, "/unreadable/")
        await store.commit([Put(store.keys.node("A"), pb.Node(id="A", name="host-a"), 0)])
        cluster = Cluster(store)
        await cluster.start()
        await cluster.stop()
        store.lose = 1
        with pytest.raises(UnavailableError):
            await cluster._commit([Put(store.keys.task("web", 1), pb.Task(id="web.1.x"), 0)])
        store.unreadable = True
        with pytest.raises(UnavailableError, match="cannot be read"):
            await cluster.set_availability("host-a", pb.NODE_AVAILABILITY_DRAIN)
        assert (await Store.load(store)).nodes["A"].value.availability != pb.NODE_AVAILABILITY_DRAIN
        store.unreadable = False
        await cluster.set_availability("host-a", pb.NODE_AVAILABILITY_DRAIN)
        assert store.keys.task("web", 1) in cluster.state.tasks
        await store.close()

    run(go())


def test_a_write_cancelled_in_flight_is_read_back_before_the_next_one(etcd: str) -> None:
    """gRPC cancels a handler whose client gave up (its deadline passed while the writer lock was
    held by a long pass, or it disconnected). If that happens while its transaction is in flight,
    etcd may have committed it: the next writer must read it back, not decide without it."""

    class SlowReply(Store):
        """The real store; after etcd commits, the reply takes forever when ``slow`` is set."""

        slow = False
        committed = asyncio.Event()

        async def _commit_batch(self, batch):  # type: ignore[no-untyped-def]
            revision = await super()._commit_batch(batch)
            if self.slow:
                self.committed.set()
                await asyncio.Event().wait()
            return revision

    async def go() -> None:
        store = SlowReply(etcd, "/cancelled/")
        SlowReply.committed = asyncio.Event()
        cluster = Cluster(store)
        await cluster.start()
        await cluster.stop()  # the loops are not needed: the test drives the writer itself
        store.slow = True
        call = asyncio.create_task(
            cluster.create_service(pb.ServiceSpec(name="web", image="nginx:1", replicas=2))
        )
        await asyncio.wait_for(SlowReply.committed.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        store.slow = False
        assert "web" in (await store.load()).services  # etcd has it ...
        assert "web" not in cluster.state.services  # ... the cache did not hear of it
        await cluster.reconcile_once()  # the next writer
        assert "web" in cluster.state.services
        assert sorted(t.value.slot for t in cluster.state.tasks.values()) == [1, 2]
        await store.close()

    run(go())


def test_a_node_whose_registration_reply_was_lost_is_not_declared_down_at_once(etcd: str) -> None:
    """A node down for a minute registers again; etcd commits it ready but the reply is lost.
    When the next writer reads that back, the node gets a fresh deadline (as at controller
    start) instead of being judged by the silence from before it came back."""
    from berth.controller.errors import UnavailableError
    from berth.controller.nodes import Liveness
    from berth.proto.berth.v1 import agent_pb2

    async def go() -> None:
        store = LostReply(etcd, "/regloss/")
        down = pb.Node(id="A", name="host-a", state=pb.NODE_STATE_DOWN)
        await store.commit([Put(store.keys.node("A"), down, 0)])
        now = [1000.0]
        cluster = Cluster(store, liveness=Liveness(clock=lambda: now[0]))
        await cluster.start()
        await cluster.stop()
        now[0] += 60.0  # down for a minute
        store.lose = 1
        with pytest.raises(UnavailableError):
            await cluster.register(agent_pb2.Register(node_id="A", name="host-a", address="10.0.0.1"))
        await cluster.set_availability("host-a", pb.NODE_AVAILABILITY_ACTIVE)  # the next writer
        assert cluster.state.nodes["A"].value.state == pb.NODE_STATE_READY
        now[0] += 0.25
        await cluster.check_liveness()
        assert cluster.state.nodes["A"].value.state == pb.NODE_STATE_READY
        now[0] += cluster.liveness.deadline  # and silence after that is judged as always
        await cluster.check_liveness()
        assert cluster.state.nodes["A"].value.state == pb.NODE_STATE_DOWN
        await store.close()

    run(go())


def test_plans_never_take_the_threads_the_placement_pass_needs(
    etcd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``berth plan`` runs off the event loop, on a worker of its own: however many plans are
    stuck (a slow plan keeps running after its client gave up), the real pass still gets a thread
    from the default pool for reconcile and the scheduler."""
    import threading

    from berth.controller import cluster as cluster_module

    release = threading.Event()
    ran_on: list[str] = []

    def stuck_preview(*args: object, **kwargs: object) -> None:
        ran_on.append(threading.current_thread().name)
        release.wait(30)

    async def go() -> None:
        store = Store(etcd, "/planpool/")
        cluster = Cluster(store)
        await cluster.start()
        await cluster.stop()
        monkeypatch.setattr(cluster_module, "preview", stuck_preview)
        spec = pb.ServiceSpec(name="web", image="nginx:1", replicas=1)
        plans = [asyncio.create_task(cluster.plan([spec])) for _ in range(40)]
        await asyncio.sleep(0.2)
        for plan in plans:
            plan.cancel()
        try:
            # the default pool has min(32, cores + 4) workers: 40 stuck plans would hold them all
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)
        finally:
            release.set()
        assert ran_on and all(name.startswith("berth-plan") for name in ran_on)
        await store.close()

    run(go())
