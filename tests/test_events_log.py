"""The agent's event log on its own: numbering, the window, gaps, followers, the journal, and
the container hooks that feed it (on fake cgroup files). Pure logic, no agent process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bulkhead_agent.containers.process import ExitInfo
from bulkhead_agent.events import log as ev
from bulkhead_agent.events.containers import ContainerEvents
from bulkhead_agent.events.log import Ahead, EventLog, Gap

DEADLINE = 5.0


def emit_n(log: EventLog, n: int) -> None:
    for i in range(n):
        log.emit(ev.CONTAINER_STARTED, container_id=f"c{i}", pid=100 + i)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, DEADLINE))


async def take(log: EventLog, n: int, since: int | None, **kw) -> list[ev.Event]:  # type: ignore[no-untyped-def]
    out = []
    async with contextlib.aclosing(log.follow(since, **kw)) as events:
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
    return out


def test_numbers_without_holes_and_after() -> None:
    log = EventLog()
    assert (log.newest, log.oldest) == (0, 1)
    emit_n(log, 5)
    assert [e.seq for e in log.after(0)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in log.after(3)] == [4, 5]
    assert log.after(5) == []
    assert [e.seq for e in log.after(1, limit=2)] == [2, 3]
    with pytest.raises(Ahead):
        log.after(6)


def test_the_window_keeps_the_last_events_and_names_a_gap() -> None:
    log = EventLog(window=4)
    emit_n(log, 10)
    assert (log.oldest, log.newest) == (7, 10)
    assert [e.seq for e in log.after(6)] == [7, 8, 9, 10]  # exactly what is kept: no gap
    with pytest.raises(Gap) as info:
        log.after(3)
    assert (info.value.lost_from, info.value.lost_to, info.value.oldest) == (4, 6, 7)
    assert "4..6" in str(info.value)


def test_events_lost_is_not_recordable() -> None:
    with pytest.raises(ValueError):
        EventLog().emit(ev.EVENTS_LOST)
    with pytest.raises(ValueError):
        EventLog().emit("no_such_kind")


def test_follow_from_now_gets_only_new_events() -> None:
    async def main() -> list[int]:
        log = EventLog()
        emit_n(log, 3)
        task = asyncio.create_task(take(log, 2, None))
        await asyncio.sleep(0)  # the follower starts at the newest (3)
        emit_n(log, 2)
        return [e.seq for e in await task]

    assert run(main()) == [4, 5]


def test_concurrent_followers_each_get_everything_in_order_once() -> None:
    async def main() -> list[list[int]]:
        log = EventLog()
        emit_n(log, 10)
        followers = [asyncio.create_task(take(log, 300, since)) for since in (0, 0, 5)]
        for i in range(290):
            log.emit(ev.PROCESS_EXITED, container_id="c", exec_id=f"e{i}")
            if i % 7 == 0:
                await asyncio.sleep(0)  # let them interleave with the writer
        log.emit(ev.OOM_KILL, container_id="c", oom_kills=1)
        done = [[e.seq for e in await t] for t in followers[:2]]
        emit_n(log, 5)  # the third, starting at 5, needs 305 events in all
        done.append([e.seq for e in await followers[2]])
        assert log.followers == 0
        return done

    first, second, third = run(main())
    assert first == second == list(range(1, 301))
    assert third == list(range(6, 306))


def test_a_follower_that_reconnects_with_its_last_seq_misses_nothing() -> None:
    async def main() -> list[int]:
        log = EventLog()
        emit_n(log, 5)
        seen = [e.seq for e in await take(log, 3, 0)]  # disconnects after 3
        emit_n(log, 4)
        seen += [e.seq for e in await take(log, 6, seen[-1])]
        return seen

    assert run(main()) == list(range(1, 10))


def test_a_follower_behind_the_window_gets_an_error_or_one_events_lost() -> None:
    async def strict() -> None:
        log = EventLog(window=3)
        emit_n(log, 6)
        await take(log, 1, 1)

    with pytest.raises(Gap):
        run(strict())

    async def lenient() -> list[dict]:
        log = EventLog(window=3)
        emit_n(log, 6)
        return [e.to_dict() for e in await take(log, 4, 1, accept_gap=True)]

    got = run(lenient())
    assert got[0]["kind"] == ev.EVENTS_LOST
    assert (got[0]["seq"], got[0]["lost_from"], got[0]["lost_to"]) == (3, 2, 3)
    assert [e["seq"] for e in got[1:]] == [4, 5, 6]


def test_a_slow_follower_is_told_when_the_window_passes_it() -> None:
    async def main() -> list[dict]:
        log = EventLog(window=4)
        emit_n(log, 2)
        seen = []
        async for event in log.follow(0, accept_gap=True):
            seen.append(event.to_dict())
            if len(seen) == 1:
                emit_n(log, 10)  # while it "writes" event 1, the window moves past 2..8
            if event.seq == 12:
                break
        return seen

    seen = run(main())
    kinds = [(e["kind"], e["seq"]) for e in seen]
    # Event 2 was handed over in the batch before the window moved: still a correct event.
    assert kinds[:2] == [(ev.CONTAINER_STARTED, 1), (ev.CONTAINER_STARTED, 2)]
    assert kinds[2] == (ev.EVENTS_LOST, 8)
    assert (seen[2]["lost_from"], seen[2]["lost_to"]) == (3, 8)
    assert [s for _, s in kinds[3:]] == [9, 10, 11, 12]


def test_following_from_a_seq_never_issued_fails_at_once() -> None:
    async def main() -> None:
        log = EventLog()
        emit_n(log, 2)
        await take(log, 1, 7)

    with pytest.raises(Ahead, match="since=7 is past the newest event 2"):
        run(main())


def test_the_journal_carries_the_window_over_a_restart(tmp_path: Path) -> None:
    journal = str(tmp_path / "events.jsonl")
    first = EventLog(window=8, journal=journal)
    emit_n(first, 3)
    exit_info = ExitInfo("exited", 42, exit_code=3)._asdict()
    first.emit(ev.CONTAINER_EXITED, container_id="c0", pid=42, exit=exit_info)
    first.close()

    second = EventLog(window=8, journal=journal)
    assert (second.oldest, second.newest) == (1, 4)
    second.emit(ev.AGENT_RESTARTED, agent_restarts=1)
    got = [e.to_dict() for e in second.after(2)]
    assert [(e["seq"], e["kind"]) for e in got] == [
        (3, ev.CONTAINER_STARTED),
        (4, ev.CONTAINER_EXITED),
        (5, ev.AGENT_RESTARTED),
    ]
    assert got[1]["exit"] == exit_info and got[2]["agent_restarts"] == 1


def test_the_journal_stays_bounded_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(window=8, journal=str(path))
    emit_n(log, 50)
    lines = path.read_text().splitlines()
    assert len(lines) <= 8 + 8 // 4
    assert json.loads(lines[-1])["seq"] == 50
    log.close()
    with open(path, "a") as f:
        f.write('{"seq": 51, "kind": "container_sta')  # the agent died mid-write
    again = EventLog(window=8, journal=str(path))
    assert (again.oldest, again.newest) == (43, 50)
    assert again.emit(ev.AGENT_RESTARTED).seq == 51


def test_an_unwritable_journal_only_costs_the_restart(tmp_path: Path) -> None:
    errors: list[str] = []
    log = EventLog(journal=str(tmp_path / "missing" / "events.jsonl"), on_error=errors.append)
    assert log.emit(ev.CONTAINER_STARTED).seq == 1
    assert errors and "no journal" in errors[0]


# --- the container hooks, on fake cgroup files ---------------------------------------------


def fake_container(tmp_path: Path, container_id: str, oom_kills: int = 0) -> SimpleNamespace:
    group = tmp_path / container_id
    group.mkdir()
    (group / "memory.events").write_text(
        f"low 0\nhigh 0\nmax 3\noom {oom_kills}\noom_kill {oom_kills}\n"
    )
    init = SimpleNamespace(pid=7, exec_id="", exit=None)
    container = SimpleNamespace(
        id=container_id, init=init, cgroup=SimpleNamespace(path=str(group)), execs={}
    )
    return container


def set_oom_kills(container: SimpleNamespace, n: int) -> None:
    Path(container.cgroup.path, "memory.events").write_text(f"oom {n}\noom_kill {n}\n")


def test_container_hooks_make_start_exit_and_one_event_per_oom_kill(tmp_path: Path) -> None:
    async def main() -> list[dict]:
        log = EventLog()
        hooks = ContainerEvents(log)
        c = fake_container(tmp_path, "web", oom_kills=1)  # a kill from before: not reported
        hooks.started(c)
        hooks.started(c)  # told twice (exit before the start reply): one event
        exec_record = SimpleNamespace(pid=9, exec_id="job", exit=None)
        set_oom_kills(c, 3)
        exec_record.exit = ExitInfo("signaled", 9, signal=9, oom_killed=True)
        hooks.exited(c, exec_record)
        c.init.exit = ExitInfo("exited", 7, exit_code=0)
        hooks.exited(c, c.init)
        hooks.removed(c)
        hooks.close()
        return [e.to_dict() for e in log.after(0)]

    got = run(main())
    assert [(e["kind"], e.get("oom_kills", 0)) for e in got] == [
        (ev.CONTAINER_STARTED, 0),
        (ev.OOM_KILL, 2),
        (ev.OOM_KILL, 3),
        (ev.PROCESS_EXITED, 0),
        (ev.CONTAINER_EXITED, 0),
    ]
    assert got[3]["exec_id"] == "job" and got[3]["exit"]["oom_killed"] is True
    assert got[4]["exit"]["exit_code"] == 0 and "exec_id" not in got[4]


def test_an_exit_read_before_the_start_reply_still_follows_its_start(tmp_path: Path) -> None:
    async def main() -> list[str]:
        log = EventLog()
        hooks = ContainerEvents(log)
        c = fake_container(tmp_path, "quick")
        c.init.exit = ExitInfo("exited", 7, exit_code=5)
        hooks.exited(c, c.init)  # the spawner's exit report won the race
        hooks.started(c)  # the manager's own call, after its await
        return [e.kind for e in log.after(0)]

    assert run(main()) == [ev.CONTAINER_STARTED, ev.CONTAINER_EXITED]


def test_a_container_that_failed_to_start_has_an_exit_but_no_start(tmp_path: Path) -> None:
    async def main() -> list[dict]:
        log = EventLog()
        hooks = ContainerEvents(log)
        c = fake_container(tmp_path, "broken")
        c.init.exit = ExitInfo("start_failed", 7, step="exec", errno=2, message="no such file")
        hooks.exited(c, c.init)
        return [e.to_dict() for e in log.after(0)]

    (only,) = run(main())
    assert only["kind"] == ev.CONTAINER_EXITED and only["exit"]["step"] == "exec"


def test_the_oom_watcher_reports_a_change_of_a_kernfs_file_only(tmp_path: Path) -> None:
    async def main() -> bool:
        log = EventLog()
        hooks = ContainerEvents(log)
        c = fake_container(tmp_path, "plain")
        hooks.started(c)
        watching = hooks.oom.watched  # a plain file cannot be polled: checks at exit instead
        hooks.close()
        return watching

    assert run(main()) == 0


def test_an_adopted_container_gets_the_exits_no_agent_reported(tmp_path: Path) -> None:
    async def main() -> list[tuple[str, str]]:
        log = EventLog()
        c = fake_container(tmp_path, "kept")
        c.init.exit = None
        reported = SimpleNamespace(pid=11, exec_id="a", exit=ExitInfo("exited", 11, exit_code=1))
        log.emit(ev.PROCESS_EXITED, container_id="kept", exec_id="a", pid=11)  # the old agent's
        missed = SimpleNamespace(pid=12, exec_id="b", exit=ExitInfo("exited", 12, exit_code=2))
        c.records = lambda: [c.init, reported, missed]
        hooks = ContainerEvents(log)
        hooks.adopted(c)
        hooks.close()
        return [(e.kind, e.exec_id) for e in log.after(0)]

    assert run(main()) == [(ev.PROCESS_EXITED, "a"), (ev.PROCESS_EXITED, "b")]
