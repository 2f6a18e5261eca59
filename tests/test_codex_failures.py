"""Codex failures in the wild, through the real Codex CLI against the fake model provider's error answers.

A failed turn is classified by its TurnError.codexErrorInfo: capacity (usage or rate limits, overload) and account
(401) refusals hold every launch until a time and never fail an issue or spend a budget; a full context window
moves the run to a fresh thread with a hand-off, once; a configuration error fails naming the keys to fix.
"""
import datetime
import json
import time

import pytest

import patchrelay
from helpers import bodies, db, db_exec, say, tool


def http_error(status, body, headers=None):
    return {"kind": "http_error", "status": status, "body": body, "headers": headers or {}}


USAGE_LIMIT = http_error(429, {"error": {"type": "usage_limit_reached", "message": "You've hit your usage limit.",
                                         "resets_in_seconds": 3600}})
RATE_LIMIT = http_error(429, {"error": {"type": "rate_limit_exceeded", "message": "Rate limit reached"}},
                        {"retry-after": "2"})
OVERLOADED = http_error(503, {"error": {"type": "server_is_overloaded", "message": "Overloaded"}})
UNAUTHORIZED = http_error(401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                          "message": "Incorrect API key provided"}})
CONTEXT_FULL = http_error(400, {"error": {"type": "invalid_request_error", "code": "context_length_exceeded",
                                          "message": "Your input exceeds the context window of this model."}})
NO_SUCH_MODEL = http_error(404, {"error": {"type": "invalid_request_error", "code": "model_not_found",
                                           "message": "The model `gpt-x` does not exist"}})


def ended_runs(world, n, timeout=60):
    """Wait until the issue has `n` runs, none claimed or running, and their workers have exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = db(world, "SELECT * FROM runs ORDER BY id")
        if len(rows) >= n and all(r["status"] not in ("claimed", "running") for r in rows) and not any(
                patchrelay.process_alive(r["worker_pid"], r["worker_started"]) for r in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"runs did not end: {db(world, 'SELECT id, status, failure_reason FROM runs')}")


def issue(world, key="APP-1"):
    return db(world, "SELECT * FROM issues WHERE key = ?", (key,))[0]


def lift_hold(world):
    """As if the hold's time had just passed (its end a second ago)."""
    [row] = db(world, "SELECT value FROM meta WHERE key = 'runner.codex_hold'")
    hold = {**json.loads(row["value"]), "until": patchrelay.iso(patchrelay.utcnow() - datetime.timedelta(seconds=1))}
    db_exec(world.state, "UPDATE meta SET value = ? WHERE key = 'runner.codex_hold'", (json.dumps(hold),))


@pytest.mark.parametrize("refusal, said", [
    (USAGE_LIMIT, "Codex usage limit reached; continuing at "),
    (RATE_LIMIT, "The model provider is rate limiting Codex (HTTP 429); continuing at "),
    (OVERLOADED, "The model provider is over capacity (httpConnectionFailed, HTTP 503); continuing at "),
], ids=["usage-limit", "rate-limit", "overloaded"])
def test_a_capacity_refusal_holds_work_and_fails_nothing(world, refusal, said):
    world.use_codex([refusal, tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    world.tick_subprocess()
    run = ended_runs(world, 1)[0]
    row = issue(world)
    assert run["status"] == "held" and row["factory_state"] == "delegated", (run, row["factory_state"])
    assert row["pending_run_type"] == "implementation" and row["retries"] == 0
    assert json.loads(row["pending_context"])["attempt"] == 1                      # no retry budget spent
    notices = [b for b in bodies(world, session, "thought") if "continuing at" in b]
    assert len(notices) == 1 and notices[0].startswith(said), bodies(world, session, "thought")
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    hold = st["codex_hold"]
    assert hold["kind"] == "capacity" and hold["backoff"] == 300 and hold["fix"] is None
    why = json.loads(world.cli("why", "APP-1", "--json", check=0).stdout)
    assert any(g["gate"] == "Codex capacity" and not g["ok"] for g in why["gates"]) and why["next"].startswith("wait:")

    # another issue delegated during the hold waits too, and hears it once
    _, second = world.delegate(title="Second issue")
    world.tick_subprocess()
    world.tick_subprocess()
    assert len(db(world, "SELECT id FROM runs")) == 1                               # nothing launched
    assert len([b for b in bodies(world, second, "thought") if "continuing at" in b]) == 1
    assert len([b for b in bodies(world, session, "thought") if "continuing at" in b]) == 1

    lift_hold(world)                                                                 # the hold lifts by itself
    world.tick_subprocess()
    runs = ended_runs(world, 2)
    assert runs[1]["status"] == "completed" and runs[1]["run_type"] == "implementation", runs[1]


def test_a_provider_that_keeps_refusing_doubles_the_hold(world):
    world.use_codex([USAGE_LIMIT, USAGE_LIMIT, say("done")])
    world.delegate()
    world.tick_subprocess()
    ended_runs(world, 1)
    first = json.loads(world.cli("status", "--json", check=0).stdout)["codex_hold"]
    lift_hold(world)
    world.tick_subprocess()
    ended_runs(world, 2)
    second = json.loads(world.cli("status", "--json", check=0).stdout)["codex_hold"]
    assert (first["backoff"], second["backoff"]) == (300, 600)
    assert issue(world)["factory_state"] == "delegated"


def test_an_account_refusal_holds_work_and_names_the_fix(world):
    world.use_codex([UNAUTHORIZED, say("done")])
    _, session = world.delegate()
    world.tick_subprocess()
    run = ended_runs(world, 1)[0]
    row = issue(world)
    assert run["status"] == "held" and row["factory_state"] == "delegated" and row["pending_run_type"]
    hold = json.loads(world.cli("status", "--json", check=0).stdout)["codex_hold"]
    assert hold["kind"] == "account" and "HTTP 401" in hold["reason"]
    assert "codex login" in hold["fix"] and "$FAKE_API_KEY" in hold["fix"]         # the provider's env_key
    text = world.cli("status", check=0).stdout
    assert "HELD until" in text and "codex login" in text
    why = json.loads(world.cli("why", "APP-1", "--json", check=0).stdout)
    assert "codex login" in why["next"]
    notices = [b for b in bodies(world, session, "thought") if "Runs are on hold" in b]
    assert len(notices) == 1 and "codex login" in notices[0]
    doctor = json.loads(world.cli("doctor", "--json", check=1).stdout)
    assert any(c["level"] == "FAIL" and c["scope"] == "codex" and "runs are held" in c["message"]
               for c in doctor["checks"])


def test_a_full_context_window_continues_once_in_a_fresh_thread_with_a_handoff(world):
    model = world.use_codex([tool("echo hello > hello.txt"), CONTEXT_FULL,
                             tool("echo more >> hello.txt"), say("Finished in a fresh thread.")])
    _, session = world.delegate()
    world.tick_subprocess()
    first = ended_runs(world, 1)[0]
    row = issue(world)
    assert first["status"] == "interrupted" and row["pending_run_type"] == "implementation"
    assert row["thread_id"] is None and json.loads(row["pending_context"])["fresh_thread"] is True
    assert any("outgrew the model's context window" in b for b in bodies(world, session, "thought"))
    world.tick_subprocess()
    second = ended_runs(world, 2)[1]
    assert second["status"] == "completed", second
    assert second["thread_id"] != first["thread_id"]
    assert "## Work so far" in second["prompt"] and "hello.txt" in second["prompt"]   # the diff stat
    assert len(model.requests) == 4


def test_a_full_context_window_twice_fails_the_run(world):
    world.use_codex([CONTEXT_FULL, CONTEXT_FULL])
    world.delegate()
    world.tick_subprocess()
    ended_runs(world, 1)
    world.tick_subprocess()
    runs = ended_runs(world, 2)
    assert runs[1]["status"] == "failed" and "context window is full again" in runs[1]["failure_reason"]
    assert issue(world)["factory_state"] == "failed"


def test_an_unknown_model_fails_naming_the_config_keys(world):
    world.use_codex([NO_SUCH_MODEL])
    _, session = world.delegate()
    world.tick_subprocess()
    run = ended_runs(world, 1)[0]
    assert run["status"] == "failed" and "modelNotFound" in run["failure_reason"]
    assert "codex.model" in run["failure_reason"] and "codex.model_provider" in run["failure_reason"]
    assert issue(world)["factory_state"] == "failed"
    assert json.loads(world.cli("status", "--json", check=0).stdout)["codex_hold"] is None


# ---- the pure rules: which kind each codexErrorInfo is, and how long a hold lasts

@pytest.mark.parametrize("info, kind", [
    ("usageLimitExceeded", "capacity"), ("rateLimitExceeded", "capacity"), ("serverOverloaded", "capacity"),
    ("flexUnavailable", "capacity"), ("policyCapacityUnavailable", "capacity"),
    ({"responseTooManyFailedAttempts": {"httpStatusCode": 429}}, "capacity"),
    ({"httpConnectionFailed": {"httpStatusCode": 503}}, "capacity"),
    ({"responseStreamDisconnected": {"httpStatusCode": None}}, "capacity"),
    ({"httpConnectionFailed": {"httpStatusCode": 401}}, "account"), ("unauthorized", "account"),
    ({"responseStreamConnectionFailed": {"httpStatusCode": 403}}, "account"),
    ("contextWindowExceeded", "context"), ("modelNotFound", "configuration"), ("badRequest", "configuration"),
    ({"httpConnectionFailed": {"httpStatusCode": 400}}, None), ("sandboxError", None), ("other", None), (None, None),
])
def test_failure_kinds_follow_codex_error_info(info, kind):
    assert patchrelay.failure_kind(info) == kind


def test_a_hold_uses_the_reset_time_else_a_backoff_that_doubles_up_to_an_hour():
    now = patchrelay.parse_iso("2026-12-04T12:00:00Z")
    later = patchrelay.parse_iso("2026-12-04T13:30:00Z")
    h = patchrelay.next_hold(None, "capacity", "limit", None, now, 300, reset_at=later)
    assert h["until"] == "2026-12-04T13:30:00.000Z"                                  # Codex's reset time
    h = patchrelay.next_hold(None, "capacity", "limit", None, now, 300)
    assert (h["backoff"], h["until"]) == (300, "2026-12-04T12:05:00.000Z")
    backoffs = []
    for _ in range(6):                                       # refused again right after each hold ends
        now = patchrelay.parse_iso(h["until"])
        h = patchrelay.next_hold(h, "capacity", "limit", None, now, 300)
        backoffs.append(h["backoff"])
    assert backoffs == [600, 1200, 2400, 3600, 3600, 3600]
    quiet = patchrelay.parse_iso(h["until"]) + patchrelay.dt.timedelta(hours=2)   # a quiet spell resets it
    assert patchrelay.next_hold(h, "capacity", "limit", None, quiet, 300)["backoff"] == 300
    assert patchrelay.active_hold(h, patchrelay.parse_iso(h["until"]) - patchrelay.dt.timedelta(seconds=1))
    assert patchrelay.active_hold(h, patchrelay.parse_iso(h["until"])) is None
