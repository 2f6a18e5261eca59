"""Faults: every kind of bad Linear answer, on every operation PatchRelay sends, ends in one clear line,
the right exit code, nothing lost and nothing done twice; the next healthy tick completes the work.

The matrix is fault kind x operation. Each case delegates an issue (a new agent session with a prompt),
makes the faulty operation fail on every attempt of one tick, then lets Linear heal. After the faulty tick:
no traceback, every stderr line is one `failed: ...` line naming the operation, exit code 0 or 1 (a step
that failed reports 1), no outbox row left leased. After the healthy ticks: the issue is tracked with
exactly one pending implementation run, the session got exactly one acknowledgement, and a further tick
changes nothing.
"""
import json
import subprocess
import time

import pytest

from helpers import db_exec, db_rows, pause, say, show, status, tick_inproc, tool, wait_done

READS = ["PatchRelayViewer", "PatchRelayPoll", "PatchRelaySessionActivities", "PatchRelayComments"]
# Reads a first tick does not make: a healthy tick goes first (it tracks the issue; the next tick reads its
# comment history), and the activities read needs more new activities than come with the session.
LATER = {"PatchRelayComments", "PatchRelaySessionActivities"}
WRITES = ["PatchRelayWrites", "PatchRelayIssueStates", "PatchRelayMoveIssue"]   # activity + plan go batched

FAULTS = {
    "http-500": lambda lin, op: lin.fail_next(9, status=500, operation=op),
    "http-502-html": lambda lin, op: lin.reply_next(b"<html><body><h1>502 Bad Gateway</h1></body></html>", 9,
                                                    status=502, operation=op),
    "http-429": lambda lin, op: lin.rate_limit_next(9, style="429", retry_after=0, operation=op),
    "ratelimited-400": lambda lin, op: lin.rate_limit_next(9, style="400", retry_after=0, operation=op),
    "timeout": lambda lin, op: lin.hang_next(3, 9, operation=op),
    "truncated-json": lambda lin, op: lin.reply_next(b'{"data": {"viewer": {"id": "x', 9, operation=op),
    "json-string": lambda lin, op: lin.reply_next("boom", 9, operation=op),
    "data-null": lambda lin, op: lin.reply_next({"data": None}, 9, operation=op),
    "data-empty": lambda lin, op: lin.reply_next({"data": {}}, 9, operation=op),
    "errors-string": lambda lin, op: lin.reply_next({"errors": "boom"}, 9, operation=op),
    "errors-no-extensions": lambda lin, op: lin.reply_next({"errors": [{"message": "Internal error"}]}, 9,
                                                           operation=op),
    "errors-with-extensions": lambda lin, op: lin.reply_next(
        {"errors": [{"message": "Something broke", "extensions": {"code": "INTERNAL_SERVER_ERROR"}}],
         "data": None}, 9, operation=op),
}


def picked_up(world, session):
    return [a for a in world.linear.activities(session)
            if a["content"]["type"] == "thought" and a["content"].get("body", "").startswith("Picked up")]


def leased_rows(world):
    return db_rows(world.state, "SELECT COUNT(*) AS n FROM outbox WHERE lease_until IS NOT NULL")[0]["n"]


@pytest.mark.parametrize("op", READS + WRITES)
@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_bad_linear_answer_is_one_line_and_nothing_is_lost_or_done_twice(world, kind, op):
    world.config["linear"]["timeout"] = 1
    world.write_config()
    pause(world)
    issue, session = world.delegate()
    if op in LATER:
        tick_inproc(world)
    if op == "PatchRelaySessionActivities":
        for n in range(7):
            world.linear.add_prompt(session, world.alice, f"one more thing ({n})")
    FAULTS[kind](world.linear, op)

    r = tick_inproc(world, check=None)
    assert op in world.linear.faults_taken, f"the fault on {op} never fired: {world.linear.operations()[-6:]}"
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode in (0, 1), out
    for line in r.stderr.splitlines():
        assert line.startswith("failed: ") and "\n" not in line, r.stderr
    if r.returncode == 1:
        assert r.stderr.strip(), "a failed tick says why"
    assert leased_rows(world) == 0, "an outbox row was left leased"

    world.linear._faults.clear()                 # Linear heals
    tick_inproc(world)
    tick_inproc(world)
    st = status(world)
    assert [i["key"] for i in st["issues"]] == ["APP-1"], (kind, op, st)
    s = show(world, "APP-1")
    assert s["issue"]["pending_run"] == "implementation" and s["runs"] == []
    acks = picked_up(world, session)
    assert len(acks) == 1, (kind, op, [a["content"] for a in acks])
    assert st["outbox"] == [], st["outbox"]
    before = json.dumps(show(world, "APP-1")["issue"], sort_keys=True)
    tick_inproc(world)
    after = show(world, "APP-1")["issue"]
    assert after["pending_run"] == "implementation" and after["factory_state"] == "delegated"
    assert len(picked_up(world, session)) == 1
    assert json.loads(before)["factory_state"] == after["factory_state"]


def test_a_lease_left_by_a_killed_tick_is_taken_over_at_once(world):
    """A tick killed while sending leaves its rows leased; the next tick takes them over immediately
    (the holder is dead), instead of making the session wait for the lease to expire."""
    pause(world)
    _, session = world.delegate()
    world.linear.fail_next(9, status=500, operation="PatchRelayWrites")
    tick_inproc(world, check=None)
    dead = subprocess.Popen(["true"])
    dead.wait()
    db_exec(world.state, "UPDATE outbox SET lease_until = ?, lease_pid = ?, lease_started = '1' "
                         "WHERE status = 'queued'", (time.time() + 3600, dead.pid))
    world.linear._faults.clear()
    tick_inproc(world)
    assert [a["content"]["type"] for a in world.linear.activities(session)] == ["thought"]
    assert status(world)["outbox"] == []


# ----------------------------------------------------------------------------- GitHub
GH_FAULTS = {
    "secondary-403": lambda gh, m: gh.secondary_limit_next(9, retry_after=120, style="403", match=m),
    "secondary-429": lambda gh, m: gh.secondary_limit_next(9, retry_after=120, style="429", match=m),
    "primary-exhausted": lambda gh, m: gh.primary_exhausted(reset_in=120),
    "http-502": lambda gh, m: gh.fail_next(9, status=502, match=m),
    "malformed": lambda gh, m: gh.malformed_next(9, body=b"<html>oops</html>", status=200, match=m),
    "graphql-rate-limited": lambda gh, m: gh.graphql_rate_limited_next(9, match=m),
}


@pytest.mark.parametrize("match", ["PatchRelayPullRequests", "pulls/create"])
@pytest.mark.parametrize("kind", list(GH_FAULTS))
def test_a_bad_github_answer_is_one_line_and_never_opens_twice_or_loses_the_pr(world, kind, match):
    """A run has pushed its branch; GitHub misbehaves on the observation or on opening the PR. The tick
    fails with one line and changes nothing; once GitHub heals, exactly one PR is opened and recorded."""
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    world.delegate()
    tick_inproc(world)
    wait_done(world)
    GH_FAULTS[kind](world.github, match)
    r = tick_inproc(world, check=None)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    if kind in ("primary-exhausted",) or match == "PatchRelayPullRequests" or r.returncode:
        for line in r.stderr.splitlines():
            assert line.startswith("failed: ") and "GitHub" in line, r.stderr
    s = show(world, "APP-1")
    assert s["issue"]["factory_state"] in ("ready_for_pr", "pr_open")
    assert len(world.github.prs("acme/app")) <= 1
    # GitHub heals; the recorded wait (if any) passes
    world.github._faults.clear() if hasattr(world.github, "_faults") else None
    world.github.reset_budget()
    db_exec(world.state, "UPDATE api_budget SET limited_until = NULL WHERE api = 'github'")
    tick_inproc(world)
    tick_inproc(world)
    s = show(world, "APP-1")
    assert s["issue"]["factory_state"] == "pr_open" and s["issue"]["pr"]["number"] == 1
    assert len(world.github.prs("acme/app")) == 1
