"""Linear intake at scale: what an idle tick costs and that nothing is lost or acknowledged twice.

The runner is paused (issues are tracked and acknowledged, no Codex starts); ticks run the click CLI in this
process (`helpers.tick_inproc`). Assertions are on behaviour, never on timing: the requests the fake
Linear recorded (`world.linear.requests`, with body sizes), `status --json` / `show --json`, and the
activities in the fake. bench/linear_scale.py prints the figures behind these properties.
"""
import collections
import contextlib
import time

import pytest

import patchrelay as pr
from conftest import World
from fakes.linear import FakeLinear
from helpers import db_exec, pause, status, tick_inproc

MAX_TICKS = 30          # ticks an ingest may take
IDLE_OVERLAP = 1.0      # linear.poll_overlap of the idle-cost tests (seconds)


# ----------------------------------------------------------------------------- helpers
def delegate_many(world, n, prefix="Scale issue"):
    """n delegations the way Linear makes them -> ({issue key}, [session id])."""
    keys, sessions = set(), []
    for i in range(n):
        issue, session = world.delegate(title=f"{prefix} {i}", body=f"please do task {i}")
        keys.add(issue["identifier"])
        sessions.append(session["id"])
    return keys, sessions


def acks(world, sessions):
    """{session id: number of `thought` "Picked up ..." activities} for the given sessions."""
    with world.linear.lock:
        acts = list(world.linear.activities_by_id.values())
    n = collections.Counter(a["agentSessionId"] for a in acts if a["content"].get("type") == "thought"
                            and str(a["content"].get("body") or "").startswith("Picked up"))
    return {s: n[s] for s in sessions}


def ingested(world, keys, sessions):
    """Every issue tracked, every session acknowledged, nothing left to send to Linear."""
    st = status(world)
    return keys <= {i["key"] for i in st["issues"]} and all(acks(world, sessions).values()) and not st["outbox"]


def tick_until_ingested(world, keys, sessions, max_ticks=MAX_TICKS, check=0, pause_s=0.0):
    """Ticks until everything is ingested; returns the number of ticks it took (fails after max_ticks)."""
    for n in range(1, max_ticks + 1):
        tick_inproc(world, check=check)
        if ingested(world, keys, sessions):
            return n
        time.sleep(pause_s)
    st = status(world)
    counts = collections.Counter(acks(world, sessions).values())
    missing = sorted(keys - {i["key"] for i in st["issues"]})
    raise AssertionError(f"not ingested after {max_ticks} ticks: {len(missing)} of {len(keys)} issues not tracked "
                         f"(e.g. {missing[:5]}), acknowledgements per session {dict(counts)}, "
                         f"{len(st['outbox'])} outbox row(s) left; last tick errors "
                         f"{(st.get('last_tick') or {}).get('errors')}")


def assert_nothing_lost(world, keys, sessions):
    tracked = {i["key"] for i in status(world)["issues"]}
    assert keys - tracked == set(), f"{len(keys - tracked)} delegated issue(s) not tracked"
    counts = acks(world, sessions)
    lost = [s for s, c in counts.items() if c == 0]
    dup = [s for s, c in counts.items() if c > 1]
    assert (len(lost), len(dup)) == (0, 0), f"{len(lost)} session(s) never acknowledged, {len(dup)} acknowledged " \
                                            f"more than once (of {len(sessions)})"


def settle(world, keys, sessions, extra=3):
    """Ingest, then a few more ticks so PatchRelay has read back its own writes and nothing changed since."""
    tick_until_ingested(world, keys, sessions)
    for _ in range(extra):
        tick_inproc(world)


def quiet(world):
    """A short poll_overlap for idle-cost tests: after it has passed, no change is recent enough to be
    re-read, so a tick is idle in every sense (bench/linear_scale.py shows the ticks inside the window)."""
    world.config["linear"]["poll_overlap"] = IDLE_OVERLAP
    pause(world)


def idle_settled(world, keys, sessions):
    """Settled, then the overlap window passes and one more tick reads what is left in it."""
    settle(world, keys, sessions)
    time.sleep(IDLE_OVERLAP + 0.5)
    tick_inproc(world)


def idle_tick(world):
    """One tick with nothing changed in Linear -> the requests it sent (fake records)."""
    before = len(world.linear.requests)
    tick_inproc(world)
    return world.linear.requests[before:]


def describe(recs):
    return [(r["operation"], r["request_bytes"], r["status"]) for r in recs]


def follow_up_page(rec):
    """A read that continues a connection: any cursor variable (after / before / ...After) is set."""
    query = (rec.get("query") or "").lstrip()
    variables = rec.get("variables") or {}
    return not query.startswith("mutation") and any(
        isinstance(v, str) and v and k.lower().endswith(("after", "before")) for k, v in variables.items())


@contextlib.contextmanager
def own_world(path, skew=0.0):
    """A world with its own fake Linear. `skew` (seconds, either sign) moves Linear's clock before anything
    exists in it: the fake's timestamps never go back, so moving it back later would only stall them."""
    path.mkdir(parents=True, exist_ok=True)
    fake = FakeLinear().start()
    fake.advance(skew)
    try:
        w = World(path, fake)
        yield w
        assert fake.validation_errors == [], f"GraphQL documents the real Linear API would reject: " \
                                             f"{fake.validation_errors}"
    finally:
        fake.stop()


# ----------------------------------------------------------------------------- idle cost
@pytest.mark.parametrize("n", [3, 120])
def test_idle_tick_sends_exactly_one_request_to_linear(world, n):
    quiet(world)
    keys, sessions = delegate_many(world, n)
    idle_settled(world, keys, sessions)

    for _ in range(2):
        sent = idle_tick(world)
        assert len(sent) == 1, f"idle tick with {n} tracked issues sent {len(sent)} requests: {describe(sent)}"
        assert sent[0]["status"] == 200 and not sent[0]["query"].lstrip().startswith("mutation")
    assert_nothing_lost(world, keys, sessions)


def test_the_polls_page_of_sessions_follows_how_many_changed_within_the_overlap_window(world):
    """Linear's agentSessions has no filter, so every poll reads the newest sessions again until the overlap
    window has passed them. While twelve sessions are that fresh (delegated, then acknowledged), the poll asks
    for as many as the last poll found in its window plus five, so a tick is still one request, not a poll
    and a page of sessions (with the first comment history of the issues it just tracked); once the window
    has passed, the page is five again."""
    assert [pr.poll_sessions(v) for v in (None, "0", "3", "12", "500")] == [5, 5, 8, 17, 50]
    world.config["linear"]["poll_overlap"] = 6.0
    pause(world)
    keys, sessions = delegate_many(world, 12)
    tick_until_ingested(world, keys, sessions)
    sent = idle_tick(world)                             # inside the window: the twelve are read again
    polls = [r for r in sent if r["operation"] == "PatchRelayPoll"]
    assert len(polls) == 1 and polls[0]["variables"]["sessions"] > 5, describe(sent)
    assert "PatchRelaySessions" not in [r["operation"] for r in sent], describe(sent)     # no second page
    deadline = time.time() + 30                         # the window passes: the page is five again
    while True:
        time.sleep(1.0)
        sent = idle_tick(world)
        assert [r["operation"] for r in sent] == ["PatchRelayPoll"], describe(sent)
        if sent[0]["variables"]["sessions"] == 5:
            break
        assert time.time() < deadline, f"the poll still asks for {sent[0]['variables']['sessions']} sessions"
    assert_nothing_lost(world, keys, sessions)


def test_idle_request_does_not_grow_with_the_number_of_tracked_issues(tmp_path):
    sizes = {}
    for n in (3, 120):
        with own_world(tmp_path / f"n{n}") as w:
            quiet(w)
            keys, sessions = delegate_many(w, n)
            idle_settled(w, keys, sessions)
            sent = idle_tick(w)
            sizes[n] = (sum(r["request_bytes"] for r in sent), describe(sent))
    (small, small_reqs), (big, big_reqs) = sizes[3], sizes[120]
    assert big - small <= 128, f"idle tick request bytes: {small} with 3 tracked issues ({small_reqs}), " \
                               f"{big} with 120 ({big_reqs})"


# ----------------------------------------------------------------------------- nothing lost at volume
def test_600_delegations_at_once_are_all_tracked_and_each_acknowledged_once(world):
    pause(world)
    keys, sessions = delegate_many(world, 600)

    ticks = tick_until_ingested(world, keys, sessions)
    assert ticks <= MAX_TICKS
    for _ in range(2):                  # later ticks neither lose nor re-acknowledge anything
        tick_inproc(world)
    assert_nothing_lost(world, keys, sessions)
    assert all(i["factory_state"] == "delegated" and i["pending_run"] == "implementation"
               for i in status(world)["issues"])
    # the writes went batched: several mutations per request, and no request carried more than the batch size
    writes = [r for r in world.linear.requests if r["query"] and r["query"].lstrip().startswith("mutation")]
    mutations = sum(len(r["fields"]) for r in writes)
    assert mutations >= 3 * 600 - 1, mutations            # acknowledgement, plan and move of each issue
    assert len(writes) <= mutations // 50, (len(writes), mutations)
    assert max(len(r["fields"]) for r in writes) <= 100


def _write_tick_failed(world, n=3):
    """n delegations whose writes all failed once (Linear down for the whole first tick): their rows queued."""
    pause(world)
    sessions = [world.delegate(title=f"Thing {i}")[1]["id"] for i in range(n)]
    world.linear.fail_next(99, status=503, operation="PatchRelayWrites")
    tick_inproc(world, check=None)
    world.linear._faults.clear()
    return sessions


def test_a_write_linear_refuses_does_not_hold_back_the_others_in_its_request(world):
    """One acknowledgement goes to a session Linear no longer knows: Linear refuses that mutation; the other
    writes of the request still land (those after it are sent again), only the refused one is retried."""
    sessions = _write_tick_failed(world)
    db_exec(world.state, "UPDATE outbox SET session_id = 'gone-session' WHERE kind = 'activity' AND session_id = ?",
                (sessions[1],))
    before = len(world.linear.requests)
    tick_inproc(world, check=None)
    got = acks(world, sessions)
    assert got[sessions[0]] == 1 and got[sessions[2]] == 1 and got[sessions[1]] == 0, got
    left = status(world)["outbox"]
    assert [(o["kind"], o["status"]) for o in left] == [("activity", "queued")], left
    assert left[0]["attempts"] == 2 and "Entity not found" in left[0]["last_error"], left  # 503 tick + refusal
    writes = [r for r in world.linear.requests[before:] if r["operation"] == "PatchRelayWrites"]
    assert 1 <= len(writes) <= 3, [r["fields"] for r in writes]


def test_a_request_refused_as_a_whole_is_split_and_each_write_sent_alone(world):
    """Linear refuses a whole batched document (a validation error, no path: nothing ran): the writes are
    then sent one by one in the same tick, and the refusal counts as no one's attempt."""
    sessions = _write_tick_failed(world)
    world.linear.reply_next({"errors": [{"message": 'Variable "$v1" got invalid value',
                                         "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}]}, 1, status=400,
                            operation="PatchRelayWrites")
    before = len(world.linear.requests)
    tick_inproc(world)
    assert set(acks(world, sessions).values()) == {1}
    assert status(world)["outbox"] == []
    ops = [r["operation"] for r in world.linear.requests[before:]]
    assert ops.count("PatchRelayWrites") == 1 and ops.count("PatchRelayActivity") == 3, ops   # then one by one
