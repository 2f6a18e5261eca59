"""Linear intake at scale: what an idle tick costs and that nothing is lost or acknowledged twice.

The runner is paused (issues are tracked and acknowledged, no Codex starts); ticks run the click CLI in this
process (`tick` from test_intake.py). Assertions are on behaviour, never on timing: the requests the fake
Linear recorded (`world.linear.requests`, with body sizes), `status --json` / `show --json`, and the
activities in the fake. bench/linear_scale.py prints the figures behind these properties.
"""
import collections
import contextlib
import time
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
import requests

from conftest import APP_TOKEN, World
from fakes.linear import FakeLinear, _iso
from test_intake import pause, show, status, tick

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
        tick(world, check=check)
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
        tick(world)


def quiet(world):
    """A short poll_overlap for idle-cost tests: after it has passed, no change is recent enough to be
    re-read, so a tick is idle in every sense (bench/linear_scale.py shows the ticks inside the window)."""
    world.config["linear"]["poll_overlap"] = IDLE_OVERLAP
    pause(world)


def idle_settled(world, keys, sessions):
    """Settled, then the overlap window passes and one more tick reads what is left in it."""
    settle(world, keys, sessions)
    time.sleep(IDLE_OVERLAP + 0.5)
    tick(world)


def idle_tick(world):
    """One tick with nothing changed in Linear -> the requests it sent (fake records)."""
    before = len(world.linear.requests)
    tick(world)
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
        tick(world)
    assert_nothing_lost(world, keys, sessions)
    assert all(i["factory_state"] == "delegated" and i["pending_run"] == "implementation"
               for i in status(world)["issues"])


def test_rate_limit_in_the_middle_of_paging_loses_nothing(world):
    pause(world)
    keys, sessions = delegate_many(world, 300)       # more than one page of anything Linear lists (<= 250)
    world.linear.rate_limit_next(1, style="429", retry_after=1, when=follow_up_page)

    tick(world, check=None)                          # cut short by the rate limit
    limited = [r for r in world.linear.requests if r["fault"] == "ratelimit429"]
    assert len(limited) == 1, "no follow-up page was read for 300 new delegations, so the rate limit never hit"
    time.sleep(1.2)                                  # Retry-After has passed: Linear is healthy again

    tick_until_ingested(world, keys, sessions, pause_s=0.2)
    for _ in range(2):
        tick(world)
    assert_nothing_lost(world, keys, sessions)


# ----------------------------------------------------------------------------- clock skew
@pytest.mark.parametrize("skew", [300, -300], ids=["linear-5min-ahead", "linear-5min-behind"])
def test_clock_skew_between_patchrelay_and_linear_loses_nothing(tmp_path, skew):
    """Linear's timestamps (and its Date header) are 5 minutes ahead of or behind this machine's clock:
    cursors must be Linear's time, never the local clock."""
    with own_world(tmp_path, skew=skew) as w:
        r = requests.post(w.linear.url, json={"query": "{ viewer { id } }"}, headers={"Authorization": APP_TOKEN},
                          timeout=10)
        linear_now = parsedate_to_datetime(r.headers["Date"])
        assert abs((linear_now - datetime.now(timezone.utc)).total_seconds() - skew) < 30   # the premise

        pause(w)
        tick(w)                                      # nothing in Linear yet: whatever cursors start from
        keys, sessions = delegate_many(w, 5, prefix="Before")
        tick_until_ingested(w, keys, sessions)
        tick(w)

        # Changes after PatchRelay set its cursors: new delegations, a comment, a prompt in a session.
        more_keys, more_sessions = delegate_many(w, 5, prefix="After")
        first = w.linear.issue_by_key(sorted(keys)[0])
        w.linear.add_comment(first, w.alice, "Comment after the cursors were set")
        w.linear.add_prompt(sessions[1], w.alice, "Prompt after the cursors were set", comment=True)

        tick_until_ingested(w, keys | more_keys, sessions + more_sessions)
        for _ in range(2):
            tick(w)
        assert_nothing_lost(w, keys | more_keys, sessions + more_sessions)
        inbox = collections.Counter(m["body"] for k in keys for m in show(w, k)["inbox"])
        assert inbox == {"Comment after the cursors were set": 1, "Prompt after the cursors were set": 1}


# ----------------------------------------------------------------------------- the overlap window
def test_comment_and_prompt_in_the_overlap_window_are_delivered_once(world):
    """Each tick re-reads poll_overlap seconds behind its cursors: what it reads again must not be delivered
    twice, and what Linear shows late with an earlier timestamp (inside the window) must not be skipped."""
    pause(world)
    issue, session = world.delegate()
    settle(world, {"APP-1"}, [session["id"]])

    # 1. written now: re-read by the next ticks while inside the window
    world.linear.add_comment(issue, world.alice, "comment one")
    world.linear.add_prompt(session, world.alice, "prompt one", comment=True)
    for _ in range(3):
        tick(world)

    # 2. visible only now, stamped 2 s before the newest thing PatchRelay has read (poll_overlap is 5 s)
    with world.linear.lock:
        newest = max(x["updatedAt"] for store in (world.linear.issues, world.linear.sessions,
                                                  world.linear.comments, world.linear.activities_by_id)
                     for x in store.values())
    late = _iso(datetime.fromisoformat(newest.replace("Z", "+00:00")) - timedelta(seconds=2))
    c = world.linear.add_comment(issue, world.alice, "comment two")
    p = world.linear.add_prompt(session, world.alice, "prompt two", comment=True)
    with world.linear.lock:
        for obj in (c, p, world.linear.comments[p["sourceCommentId"]]):
            obj["createdAt"] = obj["updatedAt"] = late
    for _ in range(3):
        tick(world)

    inbox = show(world, "APP-1")["inbox"]
    got = collections.Counter((m["kind"], m["source"], m["body"]) for m in inbox)
    assert {body: n for (_, _, body), n in got.items()} == \
        {"comment one": 1, "prompt one": 1, "comment two": 1, "prompt two": 1}, got
    sources = {body: source for (_, source, body) in got}
    assert sources["comment one"] == sources["comment two"] == "comment"
    assert sources["prompt one"] == sources["prompt two"] != "comment"     # a prompt, not its thread comment
    assert all(m["delivered_at"] is None for m in inbox)                    # paused: nothing ran
    assert acks(world, [session["id"]]) == {session["id"]: 1}
