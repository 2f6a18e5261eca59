"""Resilience: rate limits, Linear outages, concurrent ticks, dry runs and the tick report.

The runner is paused unless a test needs a launch. The fixture's config retries Linear calls twice
with waits capped at 0.2 s. Commands run the real click CLI in this process (same argv, environment,
exit codes and output) to keep the suite fast, except where the process itself is the point (the
concurrent tick, the stderr of a failing tick), which use real subprocesses;
PATCHRELAY_TEST_SUBPROCESS=1 runs every tick as a subprocess.
"""
import json
import re
import subprocess
import sys
import time

import pytest

import patchrelay
from conftest import PATCHRELAY
from helpers import cli_inproc, db_exec, pause, show, status, tick_inproc


# ----------------------------------------------------------------------------- helpers
def linear_api(world):
    [api] = [a for a in status(world)["api"] if a["api"] == "linear"]
    return api


def faults(world):
    return [r["fault"] for r in world.linear.requests if r["fault"]]


# ----------------------------------------------------------------------------- rate limits
@pytest.mark.parametrize("style", ["400", "429"])
def test_short_rate_limit_is_waited_out_within_the_tick(world, style):
    pause(world)
    issue, session = world.delegate()
    world.linear.rate_limit_next(style=style, retry_after=0.1)

    tick_inproc(world, check=0)
    assert faults(world) == [f"ratelimit{style}"]
    st = status(world)
    assert [(i["key"], i["factory_state"]) for i in st["issues"]] == [("APP-1", "delegated")]
    assert world.activity_types(session) == ["thought"]
    assert st["api"][0]["limited_until"] is None and st["api"][0]["last_error"] is None


def test_long_rate_limit_fails_the_tick_records_the_wait_and_loses_nothing(world):
    pause(world)
    issue, session = world.delegate()
    world.linear.rate_limit_next(style="400", retry_after=3600)

    t0 = time.time()
    p = tick_inproc(world, check=1)
    assert time.time() - t0 < 10                    # no blocking on a one-hour Retry-After
    assert re.search(r"failed: intake: Linear PatchRelay\w+ \(127\.0\.0\.1:\d+\): rate limited", p.stderr), p.stderr

    api = linear_api(world)
    until = patchrelay.parse_iso(api["limited_until"]).timestamp()
    assert 3500 < until - time.time() <= 3600
    assert "rate limited" in api["last_error"]
    assert status(world)["issues"] == []
    text = cli_inproc(world, "status").stdout
    assert f"rate limited until {api['limited_until']}" in text

    # while limited, a tick does not call Linear at all and says why
    n = len(world.linear.requests)
    p = tick_inproc(world, check=0)
    assert f"skipping intake until {api['limited_until']}" in p.stdout
    assert len(world.linear.requests) == n

    # time passes (the limit expires): the delegation made during the limit is picked up
    db_exec(world.state, "UPDATE api_budget SET limited_until = '2000-01-01T00:00:00.000Z' WHERE api = 'linear'")
    p = tick_inproc(world, check=0)
    assert "APP-1: new agent session -> implementation queued" in p.stdout
    assert world.activity_types(session) == ["thought"]
    assert linear_api(world)["limited_until"] is None


def test_rate_limited_tick_reports_exactly_one_error_line(world):
    """README/CLI contract: "Errors become one line on stderr"."""
    pause(world)
    world.delegate()
    world.linear.rate_limit_next(style="429", retry_after=3600)

    p = world.cli("tick", check=1)                  # a real process: its whole stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "rate limited" in lines[0]


def test_rate_limit_headers_are_shown_in_status(world):
    pause(world)
    world.delegate()
    world.linear.set_budget(requests_remaining=777, complexity_remaining=123456)
    n0 = len(world.linear.requests)

    tick_inproc(world)
    made = len(world.linear.requests) - n0
    api = linear_api(world)
    assert api["requests_limit"] == 5000
    assert api["requests_remaining"] == 777 - made
    assert 0 < api["complexity_remaining"] < 123456
    assert patchrelay.parse_iso(api["reset_at"]).timestamp() > time.time()
    text = cli_inproc(world, "status").stdout
    assert f"linear API: {777 - made}/5000 requests left, {api['complexity_remaining']} complexity points left" \
        in text


def test_status_shows_requests_per_tick_and_the_projected_hourly_use(world):
    pause(world)
    world.delegate()
    n0 = len(world.linear.requests)
    for _ in range(4):                                   # the intake tick, then idle ones
        tick_inproc(world)
        time.sleep(0.3)
    per_tick = (len(world.linear.requests) - n0) / 4
    use = status(world)["api_use"]
    assert use["ticks"] == 4 and use["interval_seconds"] >= 0.3, use
    lin = use["linear"]
    assert lin["requests_per_tick"] == round(per_tick, 1), (lin, per_tick)
    hourly = per_tick * 3600 / use["interval_seconds"]      # the interval is shown rounded to 0.1 s
    assert abs(lin["projected_per_hour"] - hourly) <= 0.2 * hourly, (lin, hourly)
    assert lin["share_of_limit"] == round(100 * lin["projected_per_hour"] / 5000)
    assert "linear use: " in cli_inproc(world, "status").stdout


def test_exhausted_request_budget_is_treated_as_a_rate_limit(world):
    pause(world)
    world.delegate()
    world.linear.set_budget(requests_remaining=0, reset_in=1800)

    p = tick_inproc(world, check=1)
    assert "rate limited" in p.stderr
    api = linear_api(world)
    assert 1700 < patchrelay.parse_iso(api["limited_until"]).timestamp() - time.time() <= 1800
    assert status(world)["issues"] == []


# ----------------------------------------------------------------------------- outages
def test_linear_outage_keeps_tracked_issues_and_queued_outbox_rows(world):
    pause(world)
    issue, session = world.delegate()
    world.linear.fail_next(2, status=500, operation="agentActivityCreate")
    tick_inproc(world)                                    # tracked; the thought (and the plan behind it) stay queued
    before = show(world, "APP-1")["issue"]
    queued = status(world)["outbox"]
    assert [(o["kind"], o["status"]) for o in queued] == [("activity", "queued"), ("plan", "queued")]

    # Linear is unreachable for a whole tick (connection refused)
    world.linear.stop()
    try:
        p = tick_inproc(world, check=1)
    finally:
        world.linear.start()
    assert "transport error" in p.stderr
    st = status(world)
    assert [(i["key"], i["factory_state"], i["pending_run"]) for i in st["issues"]] == \
        [("APP-1", "delegated", "implementation")]
    after = show(world, "APP-1")["issue"]
    assert {k: after[k] for k in ("factory_state", "pending_run", "pending_context", "agent_session_id",
                                  "delegated")} == \
        {k: before[k] for k in ("factory_state", "pending_run", "pending_context", "agent_session_id",
                                "delegated")}
    rows = st["outbox"]
    assert [(o["kind"], o["status"]) for o in rows] == [("activity", "queued"), ("plan", "queued")]
    assert rows[0]["attempts"] == 2 and "transport error" in rows[0]["last_error"]
    assert world.activity_types(session) == []

    # healthy again: everything queued is sent, exactly once
    tick_inproc(world, check=0)
    assert status(world)["outbox"] == []
    assert world.activity_types(session) == ["thought"]
    assert len(world.linear.plans_for(session)) == 1
    assert status(world)["issues"][0]["factory_state"] == "delegated"


def test_http_500s_during_intake_drop_nothing(world):
    pause(world)
    issue, session = world.delegate()
    tick_inproc(world)
    world.linear.add_comment(issue, world.alice, "one more detail")
    world.linear.fail_next(2, status=503, operation="PatchRelayComments")

    p = tick_inproc(world, check=1)
    assert "HTTP 503" in p.stderr
    assert show(world, "APP-1")["inbox"] == []          # nothing half-read, cursors not advanced
    assert status(world)["issues"][0]["pending_run"] == "implementation"

    tick_inproc(world, check=0)
    assert [m["body"] for m in show(world, "APP-1")["inbox"]] == ["one more detail"]


# ----------------------------------------------------------------------------- concurrency
def test_concurrent_tick_exits_zero_with_a_one_line_notice(world):
    pause(world)
    world.delegate()
    world.linear.hang_next(8)                       # the first tick's first Linear request takes 8 s
    argv = [sys.executable, str(PATCHRELAY), "--config", str(world.config_path), "tick"]
    first = subprocess.Popen(argv, env=world.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        world.wait_for(lambda: world.linear.requests, timeout=20, interval=0.05,
                       what="the first tick to reach Linear (it holds the lock)")
        second = world.cli("tick", check=0)
        assert second.stdout.strip().splitlines() == ["patchrelay: another tick is running; skipped"]
        assert second.stderr == ""
        assert len(world.linear.requests) == 1      # the second tick did not poll
    finally:
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "APP-1: new agent session -> implementation queued" in out
    assert [i["key"] for i in status(world)["issues"]] == ["APP-1"]


# ----------------------------------------------------------------------------- dry run and --json
def test_dry_run_prints_what_it_would_do_and_changes_nothing(world):
    pause(world)
    p = tick_inproc(world, "--dry-run", check=0)                  # nothing delegated yet: says so
    assert "would take 0 issue(s) (delegated to the app)" in p.stdout, p.stdout
    issue, session = world.delegate()

    p = tick_inproc(world, "--dry-run", check=0)
    assert "would: APP-1: new agent session -> implementation queued" in p.stdout
    assert "would take 1 issue(s) (delegated to the app)" in p.stdout, p.stdout

    assert status(world) == {"issues": [], "others": 0, "outbox": [], "api": [], "api_use": {"ticks": 0, "interval_seconds": None}, "last_tick": None,
                             "paused": {"by": "config", "reason": "runner.paused: true", "at": None},
                             "unrouted": [], "tokens": {"today": 0, "day_cap": None, "issue_cap": None, "run_cap": None},
                             "codex_hold": None, "flaky_checks": {},
                             "worktrees": {"count": 0, "bytes": 0, "kept": []}, "linear_token": {"source": "environment"}, "hosts": []}
    assert world.activity_types(session) == [] and world.linear.plans_for(session) == []
    assert world.linear.issue_updates == [] and world.linear.state_of(issue)["name"] == "Todo"
    assert not {"PatchRelayActivity", "PatchRelayPlan", "PatchRelayMoveIssue", "PatchRelayComment", "PatchRelayWrites"} \
        & set(world.linear.operations())

    # cursors did not move either: the real tick still sees the delegation
    p = tick_inproc(world, check=0)
    assert "APP-1: new agent session -> implementation queued" in p.stdout
    assert world.activity_types(session) == ["thought"]


def test_tick_json_report_shape(world):
    pause(world)
    world.delegate()

    report = json.loads(tick_inproc(world, "--json").stdout)
    assert set(report) == {"result", "dry_run", "steps", "errors", "actions", "api_cost"}
    assert report["api_cost"]["linear_requests"] >= 1 and report["api_cost"]["github_requests"] == 0
    assert report["result"] == "ok" and report["dry_run"] is False and report["errors"] == []
    assert set(report["steps"]) == {"reconcile", "intake", "observe", "launch", "gc", "publish", "prune"}  # prune: daily
    assert report["steps"]["intake"] == {"sessions": 1, "issues": 1, "comments": 0, "queued": ["APP-1"],
                                              "errors": []}
    assert report["steps"]["launch"] == {"paused": True, "launched": [], "waiting": ["APP-1"]}
    assert report["steps"]["publish"] == {"sent": 3, "failed": 0, "queued": 0, "busy": 0, "deferred": 0}
    assert report["actions"] == ["APP-1: new agent session -> implementation queued"]

    world.linear.rate_limit_next(style="429", retry_after=3600)
    p = tick_inproc(world, "--json", check=1)
    report = json.loads(p.stdout)
    assert report["result"] == "failed"
    host = world.linear.url.split("/")[2]
    assert report["errors"] == [f"intake: Linear PatchRelayPoll ({host}): rate limited (HTTP 429)"]
    assert report["steps"]["intake"] == {"error": f"Linear PatchRelayPoll ({host}): rate limited (HTTP 429)"}


# ----------------------------------------------------------------------------- one bad issue
def test_a_queued_run_that_cannot_be_claimed_does_not_wedge_launching(world):
    """`patchrelay retry APP-1 --type ci_repair` on an issue awaiting input is accepted ("the next tick
    launches it"); the claim must then work, or the retry must be refused - it must not make every
    later tick fail and keep other issues from being launched."""
    pause(world)
    world.delegate()
    tick_inproc(world)
    assert cli_inproc(world, "stop", "APP-1").exit_code == 0            # APP-1 awaiting_input
    cli_inproc(world, "retry", "APP-1", "--type", "ci_repair")           # accepted or refused
    world.delegate(title="second")
    world.config["runner"]["paused"] = False
    world.write_config()

    p = tick_inproc(world, "--json", check=None)
    report = json.loads(p.stdout)
    assert report["errors"] == [] and p.returncode == 0
    assert "APP-2" in [x["issue"] for x in report["steps"]["launch"]["launched"]]


# ----------------------------------------------------------------------------- writes: order, cap, budget
def test_a_burst_of_delegations_gets_first_responses_first_and_spreads_over_ticks(world):
    world.config["linear"]["max_writes_per_tick"] = 10
    pause(world)
    sessions = [world.delegate(title=f"Thing {n}")[1] for n in range(12)]
    tick_inproc(world)
    firsts = [s for s in sessions if world.activity_types(s) == ["thought"]]
    assert len(firsts) == 10                                   # the cap: 10 writes, all first responses
    assert not any(world.linear.plans.values()) and world.linear.issue_updates == []
    for _ in range(8):
        tick_inproc(world)
    for s in sessions:
        assert world.activity_types(s) == ["thought"], s["id"]  # each acknowledged exactly once
    assert status(world)["outbox"] == []
    assert len(world.linear.issue_updates) == 12


def test_optional_writes_yield_while_the_linear_budget_is_low(world):
    pause(world)
    _, session = world.delegate()
    world.linear.set_budget(requests_remaining=400, requests_limit=5000)   # under 20 % left
    tick_inproc(world)
    tick_inproc(world)
    assert world.activity_types(session) == ["thought"]        # the first response still goes out
    assert world.linear.plans_for(session) == [] and world.linear.issue_updates == []
    world.linear.set_budget(requests_remaining=5000)
    tick_inproc(world)
    tick_inproc(world)
    assert len(world.linear.plans_for(session)) == 1 and len(world.linear.issue_updates) == 1


def test_team_workflow_states_are_read_once_then_moving_an_issue_is_one_request(world):
    pause(world)
    world.delegate()
    tick_inproc(world)
    world.delegate(title="Second thing")
    world.delegate(title="Third thing")
    tick_inproc(world)
    ops = [r["operation"] for r in world.linear.requests]
    assert ops.count("PatchRelayIssueStates") == 1, ops            # the team's states, read once
    moves = [r for r in world.linear.requests if "issueUpdate" in r["fields"]]
    assert sum(r["fields"].count("issueUpdate") for r in moves) == 3
    assert len(moves) == 2, ops     # the first alone (it read the states), the other two batched in one request
    assert [u["identifier"] for u in world.linear.issue_updates] == ["APP-1", "APP-2", "APP-3"]
