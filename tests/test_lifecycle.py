"""Lifecycle: whatever people do in Linear, in any order, PatchRelay stays consistent.

One example test per user story that used to wedge or mislead PatchRelay: closing a closed issue again,
a stop that outlived its run, reopening and re-delegating a finished issue, user-mode comments (the key
owner's own, and idempotent posting), `tick --dry-run`, mentions, and reactive runs that end with work.
The random-sequence property test lives in test_lifecycle_property.py.
"""
import json
import time

import patchrelay as pr
from helpers import (cli_inproc, db_exec, db_rows, finished_issue, pause, say, show, show_untracked, status,
                     tick_inproc, tool, user_mode, wait_done)


def cursor(world, stream):
    rows = db_rows(world.state, "SELECT value FROM cursors WHERE stream = ?", (stream,))
    return rows[0]["value"] if rows else None


# ----------------------------------------------------------------------------- 1. done <-> canceled
def test_moving_a_done_issue_to_canceled_and_back_never_wedges_the_tick(world):
    pause(world)
    issue, _ = world.delegate()
    tick_inproc(world)
    for state, expected in (("Done", "done"), ("Canceled", "canceled"), ("Done", "done")):
        world.linear.update_issue(issue, state=state)
        tick_inproc(world)                                                    # exit 0 every time
        assert show(world, "APP-1")["issue"]["factory_state"] == expected

    # and intake goes on: a new delegation in the same tick as another move is acknowledged at once
    world.linear.update_issue(issue, state="Canceled")
    _, s2 = world.delegate(title="Second thing")
    out = tick_inproc(world).stdout
    assert "APP-2: new agent session -> implementation queued" in out
    assert world.activity_types(s2) == ["thought"]
    assert show(world, "APP-1")["issue"]["factory_state"] == "canceled"


def test_a_bad_issue_does_not_roll_back_the_others_and_is_named(world):
    """An observation that cannot be applied to one issue (here: a row in a state no table knows, as a
    damaged database or a downgrade would leave) is recorded on that issue; the rest of intake commits,
    the cursors move, and the tick exits 1 naming the issue."""
    pause(world)
    bad, _ = world.delegate()
    tick_inproc(world)
    db_exec(world.state, "UPDATE issues SET factory_state = 'bogus' WHERE key = 'APP-1'")
    before = cursor(world, "linear.poll.issues")
    world.linear.update_issue(bad, state="Done")
    _, s2 = world.delegate(title="Second thing")

    r = tick_inproc(world, check=1)
    assert "APP-1" in r.stderr and "illegal factory transition bogus -> done" in r.stderr, r.stderr
    assert "APP-2: new agent session -> implementation queued" in r.stdout
    assert world.activity_types(s2) == ["thought"]                      # the other issue went through
    assert show(world, "APP-2")["issue"]["pending_run"] == "implementation"
    assert cursor(world, "linear.poll.issues") >= before                      # the cursor is not held back
    events = show(world, "APP-1")["events"]
    assert any(e["level"] == "error" and "could not apply a Linear change" in e["message"] for e in events)


# ----------------------------------------------------------------------------- 2. stale stop
def test_a_stop_that_arrives_after_the_turn_never_stops_the_next_run(world):
    """`patchrelay stop` lands while the worker is pushing (the turn is over, the run not yet finished).
    The stop belongs to that run: it is dropped when the run ends, and the follow-up run completes."""
    hook = world.bare / "hooks" / "pre-receive"
    gate = world.tmp / "push-gate"
    hook.write_text(f"#!/bin/sh\ntouch {gate}.held\nwhile [ ! -e {gate} ]; do sleep 0.05; done\nexit 0\n")
    hook.chmod(0o755)
    model = world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    tick_inproc(world)
    deadline = time.time() + 60
    while not (world.tmp / "push-gate.held").exists():
        assert time.time() < deadline, "the worker never pushed"
        time.sleep(0.05)
    out = cli_inproc(world, "stop", "APP-1")
    assert out.exit_code == 0 and "run 1 will be interrupted" in out.stdout, out.output
    gate.touch()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "ready_for_pr"
    stops = [m for m in s["inbox"] if m["kind"] == "stop"]
    assert [m["delivery"] for m in stops] == ["dropped: the run had ended"]

    hook.unlink()
    model.push(tool("echo more >> hello.txt"), say("Added more."))
    world.linear.add_prompt(session, world.alice, "please add one more line")
    tick_inproc(world)
    s = wait_done(world)
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(2, "completed"), (1, "completed")]
    assert s["issue"]["factory_state"] == "ready_for_pr"


def test_patchrelay_stop_with_nothing_running_is_refused_and_leaves_no_stop_behind(world):
    pause(world)
    world.delegate()
    tick_inproc(world)
    assert cli_inproc(world, "stop", "APP-1").exit_code == 0          # drops the pending run
    r = cli_inproc(world, "stop", "APP-1")
    assert r.exit_code == 2 and "nothing is running or pending" in r.stderr
    assert [m for m in show(world, "APP-1")["inbox"] if m["kind"] == "stop"] == []


# ----------------------------------------------------------------------------- 3. restart a finished issue
def test_reopening_a_done_issue_that_is_still_delegated_starts_work_again(world):
    issue, session = finished_issue(world)

    world.linear.update_issue(issue, state="Todo")
    out = tick_inproc(world).stdout
    assert "APP-1: reopened in Linear -> implementation queued" in out
    i = show(world, "APP-1")["issue"]
    assert i["factory_state"] == "delegated" and i["pending_run"] == "implementation"


def test_reopened_but_not_delegated_waits_and_a_new_delegation_session_starts_work(world):
    pause(world)
    issue, session = world.delegate()
    tick_inproc(world)
    world.linear.update_issue(issue, state="Done", delegate=None)
    tick_inproc(world)
    world.linear.update_issue(issue, state="Todo")
    tick_inproc(world)
    i = show(world, "APP-1")["issue"]
    assert i["factory_state"] == "awaiting_input" and i["pending_run"] is None and i["delegated"] is False

    # delegating again: Linear sets the delegate and opens a new agent session
    world.linear.update_issue(issue, delegate=world.app)
    s2 = world.linear.add_session(issue, world.alice, world.app, body="take it again please")
    out = tick_inproc(world).stdout
    assert "APP-1: new agent session -> implementation queued" in out
    assert world.activity_types(s2) == ["thought"]
    assert not any("already done" in (a["content"].get("body") or "") for a in world.linear.activities(s2))


def test_un_delegating_a_done_issue_is_seen_and_delegating_it_again_restarts_it(world):
    pause(world)
    issue, _ = world.delegate()
    tick_inproc(world)
    db_exec(world.state, "UPDATE issues SET factory_state = 'done', pending_run_type = NULL WHERE key = 'APP-1'")
    world.linear.update_issue(issue, delegate=None)
    tick_inproc(world)
    assert show(world, "APP-1")["issue"]["delegated"] == 0
    world.linear.update_issue(issue, delegate=world.app)
    out = tick_inproc(world).stdout
    assert "APP-1: delegated -> implementation queued" in out


# ----------------------------------------------------------------------------- 4 + 5. user mode comments
def test_user_mode_takes_the_key_owners_own_comments_but_never_its_own_posts(world):
    uma, label, env = user_mode(world)
    pause(world)
    issue = world.linear.add_issue(world.team, "Labelled", labels=[label], creator=uma)
    tick_inproc(world, env=env)
    # PatchRelay answers as the key's owner: a stop of the pending run becomes a comment by Uma
    assert cli_inproc(world, "stop", "APP-1", env=env).exit_code == 0
    tick_inproc(world, env=env)
    posted = world.linear.comments_for(issue)
    assert len(posted) == 1 and posted[0]["userId"] == uma["id"] and posted[0]["body"].startswith("Stopped")
    # the owner replies: that reply is for the agent, PatchRelay's own comment is not
    world.linear.add_comment(issue, uma, "Use hi, not hello.")
    out = tick_inproc(world, env=env).stdout
    assert "APP-1: reply in a comment -> implementation queued" in out
    inbox = show(world, "APP-1")["inbox"]
    assert [(m["author"], m["body"]) for m in inbox if m["kind"] == "prompt"] == [("Uma User", "Use hi, not hello.")]


def test_user_mode_comment_is_posted_once_when_the_response_is_lost(world):
    uma, label, env = user_mode(world)
    pause(world)
    issue = world.linear.add_issue(world.team, "Labelled", labels=[label], creator=uma)
    tick_inproc(world, env=env)
    assert cli_inproc(world, "stop", "APP-1", env=env).exit_code == 0
    world.linear.drop_after_commit_next(1, operation="commentCreate")
    tick_inproc(world, env=env, check=None)
    tick_inproc(world, env=env)
    assert len(world.linear.comments_for(issue)) == 1
    assert [o["status"] for o in show(world, "APP-1")["outbox"] if o["kind"] == "comment"] == ["sent"]


# ----------------------------------------------------------------------------- 6. dry run
def test_dry_run_shows_the_launches_its_intake_would_queue_and_the_cost_and_changes_nothing(world):
    _, session = world.delegate()
    r = tick_inproc(world, "--dry-run")
    assert "APP-1: new agent session -> implementation queued" in r.stdout
    assert "APP-1: would launch a implementation run" in r.stdout, r.stdout
    assert "would cost" in r.stdout and "Linear request(s)" in r.stdout
    report = json.loads(tick_inproc(world, "--dry-run", "--json").stdout)
    assert report["api_cost"]["linear_reads"] >= 1 and report["api_cost"]["linear_writes"] >= 3
    assert status(world)["issues"] == [] and world.activity_types(session) == []


# ----------------------------------------------------------------------------- 7. mentions
def test_a_mention_on_an_issue_not_delegated_is_answered_and_starts_nothing(world):
    pause(world)
    issue = world.linear.add_issue(world.team, "Just asking", creator=world.alice)
    session = world.linear.add_session(issue, world.alice, world.app, body="@PatchRelay what do you think?")
    out = tick_inproc(world).stdout
    assert "APP-1: agent session answered, no run started" in out
    assert status(world)["issues"] == []
    [(kind, body)] = [(a["content"]["type"], a["content"]["body"]) for a in world.linear.activities(session)]
    assert kind == "response" and "Delegate APP-1 to me" in body
    assert "mention on APP-1" in show_untracked(world, "APP-1")


def test_a_mention_on_a_tracked_idle_undelegated_issue_starts_no_run(world):
    pause(world)
    issue, _ = world.delegate()
    tick_inproc(world)
    assert cli_inproc(world, "stop", "APP-1").exit_code == 0
    world.linear.update_issue(issue, delegate=None)
    tick_inproc(world)
    mention = world.linear.add_session(issue, world.alice, world.app, body="@PatchRelay one more idea")
    tick_inproc(world)
    i = show(world, "APP-1")
    assert i["issue"]["pending_run"] is None and i["runs"] == []
    assert [a["content"]["type"] for a in world.linear.activities(mention)] == ["response"]
    assert [m["body"] for m in i["inbox"] if m["kind"] == "prompt"] == ["@PatchRelay one more idea"]


# ----------------------------------------------------------------------------- 8. reactive run end
def test_a_reactive_run_that_completes_with_work_returns_to_pr_open():
    runner = pr.RunnerConfig()
    for state, rt in (("repairing_ci", "ci_repair"), ("changes_requested", "review_fix"),
                      ("repairing_queue", "queue_repair")):
        row = {"key": "APP-1", "factory_state": state, "branch": "app/APP-1", "pr_number": 7, "active_run_id": 3}
        d = pr.decide_run_end(row, {"run_type": rt, "attempt": 1}, pr.RunOutcome("completed", 1, True, "fixed"),
                              runner, pr.utcnow())
        assert d.fields["factory_state"] == "pr_open", (state, d.fields)


def test_every_state_can_be_closed_reopened_and_redelegated_by_linear():
    for s in pr.FACTORY_STATES:
        for closed in ("done", "canceled"):
            assert pr.transition(s, closed) == closed
    for s in ("done", "canceled"):
        assert pr.transition(s, "delegated") == "delegated"
        assert pr.transition(s, "awaiting_input") == "awaiting_input"
    assert all(set(targets) <= set(pr.FACTORY_STATES) for targets in pr.TRANSITIONS.values())
