"""Pure unit tests of the factory section: the transition table and every decision, on plain dicts and
the dataclasses the Linear client returns. No SQLite, no HTTP, no subprocesses (except `git
check-ref-format`, the authority on branch names)."""
import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

import patchrelay as pr
from patchrelay import (Actor, Decision, IllegalTransition, Identity, LinearActivity, LinearComment,
                        LinearIssue, LinearSession, RunOutcome, RunnerConfig)

NOW = "2026-01-02T03:04:05.000Z"
NOW_DT = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
APP = "app-user-id"
APP_IDENT = Identity(viewer_id=APP, app_mode=True)
USER_IDENT = Identity(viewer_id="me", app_mode=False, delegation=("delegate", "assignee", "label"))
ALICE = Actor("alice-id", "Alice Smith", "alice@acme.test")
RUNNER = RunnerConfig(retry_budget=2, retry_backoff=60)


# ----------------------------------------------------------------------------- builders
def obs(**kw):
    base = dict(id="lin-1", key="APP-1", title="Add a greeting", description="Please add hello.txt",
                url="https://linear.app/x/issue/APP-1", team_id="team-1", team_key="APP", state_name="Todo",
                state_type="unstarted", delegate_id=APP, assignee_id=None, labels=(), updated_at=NOW)
    base.update(kw)
    return LinearIssue(**base)


def row(**kw):
    base = dict(id=1, key="APP-1", title="Add a greeting", description="Please add hello.txt",
                url="https://linear.app/x/issue/APP-1", linear_id="lin-1", project_id="app",
                factory_state="delegated", delegated=1, pending_run_type=None, pending_context=None,
                active_run_id=None, agent_session_id="sess-1", branch="app/APP-1-add-a-greeting",
                worktree="/wt/APP-1", pr_number=None, pr_url=None)
    base.update(kw)
    return base


def session(issue=None, creator=ALICE):
    return LinearSession(id="sess-1", issue=issue if issue is not None else obs(), app_user_id=APP, creator=creator,
                         created_at=NOW, updated_at=NOW, comment_body="please do it")


def prompt(body="also do X", user=ALICE, signal=None, type="prompt"):
    return LinearActivity(id="act-1", session_id="sess-1", created_at=NOW, type=type, body=body, signal=signal,
                          user=user)


def comment(body="a detail", user=ALICE, session_id=None):
    return LinearComment(id="c-1", issue_linear_id="lin-1", body=body, user=user, created_at=NOW,
                         session_id=session_id)


def run(run_type="implementation", attempt=1, **ctx):
    return {"id": 7, "run_type": run_type, "attempt": attempt,
            "context": json.dumps({"trigger": "agent session", "attempt": attempt, **ctx})}


def kinds(d: Decision):
    """[(outbox kind, activity type or None)]"""
    return [(o.kind, o.payload.get("content", {}).get("type")) for o in d.outbox]


def body(d: Decision, typ):
    [b] = [o.payload["content"]["body"] for o in d.outbox if o.kind == "activity"
           and o.payload["content"]["type"] == typ]
    return b


# ----------------------------------------------------------------------------- transition table
ALL_STATES = pr.FACTORY_STATES


@pytest.mark.parametrize("current,new", [(c, n) for c in ALL_STATES for n in sorted(pr.TRANSITIONS[c])])
def test_transition_allows_every_move_in_the_table(current, new):
    assert pr.transition(current, new) == new


@pytest.mark.parametrize("current,new", [(c, n) for c in ALL_STATES for n in ALL_STATES
                                         if n != c and n not in pr.TRANSITIONS[c]])
def test_transition_rejects_every_move_not_in_the_table(current, new):
    with pytest.raises(IllegalTransition, match=f"{current} -> {new}"):
        pr.transition(current, new)


@pytest.mark.parametrize("current,new", [("done", "implementing"), ("canceled", "ready_for_pr"),
                                         ("done", "pr_open"), ("delegated", "ready_for_pr"),
                                         ("implementing", "repairing_ci"), ("nonsense", "delegated"),
                                         ("delegated", "nonsense")])
def test_transition_rejects_notable_illegal_moves(current, new):
    with pytest.raises(IllegalTransition):
        pr.transition(current, new)


def test_staying_in_a_state_is_always_allowed():
    for s in ALL_STATES:
        assert pr.transition(s, s) == s


def test_documented_happy_paths_are_legal():
    for path in (["delegated", "implementing", "ready_for_pr", "pr_open", "awaiting_queue", "done"],
                 ["delegated", "implementing", "awaiting_input", "delegated"],
                 ["delegated", "implementing", "failed", "delegated"],
                 ["done", "delegated"], ["canceled", "delegated"]):
        for a, b in zip(path, path[1:]):
            assert pr.transition(a, b) == b


# ----------------------------------------------------------------------------- decide_issue
def test_new_delegation_queues_an_implementation_run_and_acknowledges():
    d = pr.decide_issue(None, obs(), APP_IDENT, "app", NOW)
    assert d.track
    assert d.fields["factory_state"] == "delegated" and d.fields["pending_run_type"] == "implementation"
    assert d.fields["project_id"] == "app" and d.fields["linear_id"] == "lin-1" and d.fields["delegated"] == 1
    assert d.fields["pending_since"] == NOW
    assert json.loads(d.fields["pending_context"]) == {"trigger": "delegation", "attempt": 1}
    assert kinds(d) == [("activity", "thought"), ("plan", None), ("issue_state", None)]
    assert "APP-1" in body(d, "thought")


@pytest.mark.parametrize("o, ident, required", [
    (obs(delegate_id=None), APP_IDENT, False),                   # not ours
    (obs(delegate_id="someone-else"), APP_IDENT, False),
    (obs(state_type="completed", state_name="Done"), APP_IDENT, False),
    (obs(state_type="canceled", state_name="Canceled"), APP_IDENT, False),
    (obs(), APP_IDENT, True),                                    # trusted_actors: only a session starts work
    (obs(delegate_id=None, assignee_id=APP), APP_IDENT, False),  # app mode: assignment is not delegation
], ids=["undelegated", "other-delegate", "completed", "canceled", "session-required", "app-mode-assignee"])
def test_issue_that_is_not_ours_to_start_is_not_tracked(o, ident, required):
    d = pr.decide_issue(None, o, ident, "app", NOW, session_required=required)
    assert d.track is False and d.outbox == () and "pending_run_type" not in d.fields


@pytest.mark.parametrize("o", [obs(delegate_id=None, assignee_id="me"),
                               obs(delegate_id=None, labels=("Bug", "PatchRelay")),
                               obs(delegate_id="me")], ids=["assignee", "label", "delegate"])
def test_user_mode_counts_assignment_label_and_delegate(o):
    d = pr.decide_issue(None, o, USER_IDENT, "app", NOW)
    assert d.track and d.fields["pending_run_type"] == "implementation"


def test_user_mode_delegation_setting_is_honoured():
    ident = Identity(viewer_id="me", app_mode=False, delegation=("delegate",))
    assert pr.decide_issue(None, obs(delegate_id=None, assignee_id="me"), ident, "app", NOW).track is False
    assert pr.decide_issue(None, obs(delegate_id=None, labels=("patchrelay",)), ident, "app", NOW).track is False


@pytest.mark.parametrize("state", ["delegated", "implementing", "awaiting_input", "ready_for_pr", "pr_open"])
def test_state_change_of_a_known_issue_starts_nothing(state):
    r = row(factory_state=state, pending_run_type=None)
    d = pr.decide_issue(r, obs(state_name="In Review", state_type="started"), APP_IDENT, "app", NOW)
    assert "pending_run_type" not in d.fields and "factory_state" not in d.fields and d.outbox == ()
    assert d.fields["linear_state"] == "In Review"


@pytest.mark.parametrize("state_type, final", [("completed", "done"), ("canceled", "canceled"),
                                               ("duplicate", "canceled")])
def test_closed_linear_state_makes_the_issue_final_and_drops_pending_work(state_type, final):
    r = row(pending_run_type="implementation", pending_context="{}")
    d = pr.decide_issue(r, obs(state_type=state_type, state_name="X"), APP_IDENT, "app", NOW)
    assert d.fields["factory_state"] == final and d.fields["pending_run_type"] is None
    assert d.inbox == ()                       # nothing running: nothing to interrupt


def test_closing_an_issue_with_an_active_run_interrupts_it():
    r = row(factory_state="implementing", active_run_id=3)
    d = pr.decide_issue(r, obs(state_type="completed", state_name="Done"), APP_IDENT, "app", NOW)
    assert d.fields["factory_state"] == "done"
    assert [(k, src, run) for k, _, _, src, _, run in d.inbox] == [("stop", "linear", 3)]   # addressed to run 3


def test_undelegation_drops_a_pending_run_and_says_so():
    r = row(pending_run_type="implementation", pending_context="{}")
    d = pr.decide_issue(r, obs(delegate_id=None), APP_IDENT, "app", NOW)
    assert d.fields["pending_run_type"] is None and d.fields["delegated"] == 0
    assert d.fields["factory_state"] == "awaiting_input"
    assert kinds(d) == [("activity", "response")] and "un-delegated" in body(d, "response")


def test_undelegation_interrupts_an_active_run():
    r = row(factory_state="implementing", active_run_id=3)
    d = pr.decide_issue(r, obs(delegate_id=None), APP_IDENT, "app", NOW)
    assert [k for k, *_ in d.inbox] == ["stop"] and d.outbox == ()
    assert "factory_state" not in d.fields


@pytest.mark.parametrize("state", ["awaiting_input", "failed", "done", "canceled"])
def test_redelegation_of_an_idle_issue_starts_work_again(state):
    r = row(factory_state=state, delegated=0)
    d = pr.decide_issue(r, obs(), APP_IDENT, "app", NOW)
    assert d.fields["factory_state"] == "delegated" and d.fields["pending_run_type"] == "implementation"


def test_redelegation_while_busy_starts_nothing():
    r = row(factory_state="implementing", delegated=0, active_run_id=3)
    d = pr.decide_issue(r, obs(), APP_IDENT, "app", NOW)
    assert "pending_run_type" not in d.fields and d.outbox == ()


# ----------------------------------------------------------------------------- decide_session
def test_untrusted_session_is_ignored_and_logged():
    d = pr.decide_session(None, session(creator=Actor("m", "Mallory", "m@evil.test")), False, "app", "hi",
                          APP_IDENT, NOW)
    assert d.track is False and d.fields == {} and d.outbox == () and d.inbox == ()
    assert [(lvl, kind) for lvl, kind, _ in d.events] == [("warn", "trust")] and "Mallory" in d.events[0][2]


def test_untrusted_session_on_a_tracked_issue_changes_nothing():
    d = pr.decide_session(row(), session(), False, "app", "hi", APP_IDENT, NOW)
    assert d.fields == {} and d.outbox == () and d.inbox == ()


def test_trusted_new_session_starts_work_with_its_request():
    d = pr.decide_session(None, session(), True, "app", "please do it", APP_IDENT, NOW)
    assert d.fields["agent_session_id"] == "sess-1" and d.fields["pending_run_type"] == "implementation"
    assert json.loads(d.fields["pending_context"]) == {"trigger": "agent session", "attempt": 1,
                                                       "prompt": "please do it"}
    assert kinds(d) == [("activity", "thought"), ("plan", None), ("issue_state", None)]


def test_the_delegations_own_session_seen_after_its_issue_is_its_pickup_not_already_working():
    """At volume the issues poll may take a delegated issue before its agent session is read: that session is
    the delegation's own, and gets the pickup (not "Already working"); a later session does get that."""
    taken = row(agent_session_id=None, pending_run_type="implementation")
    d = pr.decide_session(taken, session(), True, "app", "please do it", APP_IDENT, NOW)
    assert d.fields["agent_session_id"] == "sess-1" and "pending_run_type" not in d.fields   # not queued twice
    assert kinds(d) == [("activity", "thought"), ("plan", None)] and body(d, "thought").startswith("Picked up APP-1")
    later = pr.decide_session(row(pending_run_type="implementation"), session(), True, "app", "more", APP_IDENT, NOW)
    assert body(later, "thought").startswith("Already working on APP-1")


def test_session_on_a_closed_issue_is_answered_not_worked():
    d = pr.decide_session(None, session(obs(state_type="completed")), True, "app", "x", APP_IDENT, NOW)
    assert d.track is False and kinds(d) == [("activity", "response")] and "pending_run_type" not in d.fields
    d = pr.decide_session(row(factory_state="done"), session(obs(state_type="completed")), True, "app", "x",
                          APP_IDENT, NOW)
    assert "pending_run_type" not in d.fields and kinds(d) == [("activity", "response")]
    assert "Reopen the issue" in body(d, "response")


def test_session_on_a_done_issue_that_linear_reopened_starts_work():
    d = pr.decide_session(row(factory_state="done"), session(), True, "app", "x", APP_IDENT, NOW)
    assert d.fields["factory_state"] == "delegated" and d.fields["pending_run_type"] == "implementation"


def test_session_on_a_busy_issue_becomes_a_message():
    d = pr.decide_session(row(factory_state="implementing", active_run_id=3), session(), True, "app",
                          "and tests", APP_IDENT, NOW)
    assert "pending_run_type" not in d.fields
    assert [(k, b, src) for k, b, _, src, _, _ in d.inbox] == [("prompt", "and tests", "agent_session")]
    assert kinds(d) == [("activity", "thought")]


# ----------------------------------------------------------------------------- decide_prompt
def test_prompt_by_an_app_or_of_another_type_is_ignored():
    assert pr.decide_prompt(row(), prompt(user=Actor("bot", "Bot", None, app=True)), True, NOW) == Decision()
    assert pr.decide_prompt(row(), prompt(type="thought"), True, NOW) == Decision()


def test_untrusted_prompt_only_logs():
    d = pr.decide_prompt(row(), prompt(), False, NOW)
    assert d.inbox == () and d.outbox == () and d.fields == {} and d.events[0][1] == "trust"


def test_stop_signal_drops_the_pending_run():
    d = pr.decide_prompt(row(pending_run_type="implementation"), prompt("stop", signal="stop"), True, NOW)
    assert d.fields["pending_run_type"] is None and d.fields["factory_state"] == "awaiting_input"
    assert d.inbox == () and [k for _, k, _ in d.events] == ["stop"]


def test_stop_signal_interrupts_the_active_run():
    d = pr.decide_prompt(row(factory_state="implementing", active_run_id=3), prompt("stop", signal="stop"),
                         True, NOW)
    assert [k for k, *_ in d.inbox] == ["stop"] and "factory_state" not in d.fields


def test_prompt_on_a_closed_issue_starts_nothing():
    d = pr.decide_prompt(row(factory_state="done"), prompt(), True, NOW)
    assert d.inbox == () and "pending_run_type" not in d.fields and kinds(d) == [("activity", "response")]


def test_prompt_while_running_is_steered_and_while_pending_is_queued():
    d = pr.decide_prompt(row(factory_state="implementing", active_run_id=3), prompt(), True, NOW)
    assert [b for _, b, *_ in d.inbox] == ["also do X"] and d.outbox[0].payload["ephemeral"] is True
    d = pr.decide_prompt(row(pending_run_type="implementation"), prompt(), True, NOW)
    assert [b for _, b, *_ in d.inbox] == ["also do X"] and d.outbox == () and d.fields == {}


def test_prompt_on_an_idle_issue_starts_a_follow_up_run():
    d = pr.decide_prompt(row(factory_state="awaiting_input"), prompt(), True, NOW)
    assert d.fields["pending_run_type"] == "implementation" and d.fields["factory_state"] == "delegated"
    assert json.loads(d.fields["pending_context"])["trigger"] == "follow-up prompt"
    assert [b for _, b, *_ in d.inbox] == ["also do X"]


# ----------------------------------------------------------------------------- decide_comment
@pytest.mark.parametrize("c", [comment(user=Actor(APP, "PatchRelay", None, app=True)),
                               comment(user=Actor("bot", "Other bot", None, app=True)),
                               comment(session_id="sess-1")], ids=["own", "other-app", "session-thread"])
def test_comments_that_are_not_for_the_agent_are_ignored(c):
    assert pr.decide_comment(row(), c, True, APP_IDENT, NOW) == Decision()


def test_comment_becomes_a_message_and_never_starts_a_run():
    for state in ("delegated", "awaiting_input", "implementing", "failed"):
        d = pr.decide_comment(row(factory_state=state), comment(), True, APP_IDENT, NOW)
        assert [(k, b, a, src, sid) for k, b, a, src, sid, _ in d.inbox] == \
            [("prompt", "a detail", "Alice Smith", "comment", "c-1")]
        assert d.fields == {} and d.outbox == ()


@pytest.mark.parametrize("trusted, state", [(False, "delegated"), (True, "done"), (True, "canceled")])
def test_untrusted_comment_or_comment_on_a_closed_issue_is_only_logged(trusted, state):
    d = pr.decide_comment(row(factory_state=state), comment(), trusted, APP_IDENT, NOW)
    assert d.inbox == () and d.outbox == () and d.fields == {} and len(d.events) == 1


# ----------------------------------------------------------------------------- decide_run_end
def test_completed_run_with_work_is_ready_for_pr_and_responds():
    d = pr.decide_run_end(row(factory_state="implementing", active_run_id=7), run(),
                          RunOutcome("completed", new_commits=2, has_work=True, summary="Added hello.txt"),
                          RUNNER, NOW_DT)
    assert d.fields == {"active_run_id": None, "factory_state": "ready_for_pr"}
    assert kinds(d) == [("activity", "response"), ("plan", None)]
    text = body(d, "response")
    assert "Pushed 2 commits to `app/APP-1-add-a-greeting`" in text and "Added hello.txt" in text
    assert [s["status"] for s in d.outbox[1].payload["plan"]] == ["completed"] * 3


def test_completed_run_with_work_on_an_issue_with_a_pr_is_pr_open():
    d = pr.decide_run_end(row(factory_state="implementing", pr_number=12), run(),
                          RunOutcome("completed", new_commits=1, has_work=True), RUNNER, NOW_DT)
    assert d.fields["factory_state"] == "pr_open" and "Pushed 1 commit to" in body(d, "response")


def test_completed_run_without_work_awaits_input_with_an_elicitation():
    d = pr.decide_run_end(row(factory_state="implementing"), run(),
                          RunOutcome("completed", has_work=False, summary="Which file?"), RUNNER, NOW_DT)
    assert d.fields == {"active_run_id": None, "factory_state": "awaiting_input"}
    assert kinds(d) == [("activity", "elicitation"), ("plan", None)]
    assert body(d, "elicitation").startswith("Which file?") and "I made no changes" in body(d, "elicitation")


def test_run_asking_for_input_posts_its_question():
    d = pr.decide_run_end(row(factory_state="implementing"), run(),
                          RunOutcome("awaiting_input", summary="Should I use v2?"), RUNNER, NOW_DT)
    assert d.fields["factory_state"] == "awaiting_input" and body(d, "elicitation") == "Should I use v2?"


@pytest.mark.parametrize("attempt", [1, 2])
def test_interrupted_run_within_budget_is_requeued_with_backoff(attempt):
    d = pr.decide_run_end(row(factory_state="implementing"), run(attempt=attempt, prompt="do it"),
                          RunOutcome("interrupted", reason="worker died"), RUNNER, NOW_DT)
    f = d.fields
    assert f["active_run_id"] is None and f["pending_run_type"] == "implementation"
    assert f["factory_state"] == "delegated" and f["retries"] == attempt
    ctx = json.loads(f["pending_context"])
    assert ctx["attempt"] == attempt + 1 and ctx["prompt"] == "do it" and "worker died" in ctx["trigger"]
    assert f["pending_since"] == pr.iso(NOW_DT)
    assert f["not_before"] == pr.iso(NOW_DT + dt.timedelta(seconds=60 * attempt))
    assert kinds(d) == [("activity", "thought")]
    assert f"retry {attempt} of 2" in body(d, "thought")


def test_interrupted_repair_run_keeps_its_state():
    d = pr.decide_run_end(row(factory_state="repairing_ci"), run("ci_repair"),
                          RunOutcome("interrupted", reason="x"), RUNNER, NOW_DT)
    assert d.fields["factory_state"] == "repairing_ci" and d.fields["pending_run_type"] == "ci_repair"


def test_interrupted_run_beyond_budget_fails_with_an_error():
    d = pr.decide_run_end(row(factory_state="implementing"), run(attempt=3),
                          RunOutcome("interrupted", reason="worker died"), RUNNER, NOW_DT)
    assert d.fields == {"active_run_id": None, "factory_state": "failed"}
    assert kinds(d) == [("activity", "error"), ("plan", None)]
    assert "worker died" in body(d, "error") and "retry budget of 2 used up" in body(d, "error")


def test_zero_retry_budget_fails_at_once():
    d = pr.decide_run_end(row(factory_state="implementing"), run(attempt=1),
                          RunOutcome("interrupted", reason="x"), RunnerConfig(retry_budget=0), NOW_DT)
    assert d.fields["factory_state"] == "failed"


def test_failed_run_fails_with_an_error():
    d = pr.decide_run_end(row(factory_state="implementing"), run(), RunOutcome("failed", reason="hook failed"),
                          RUNNER, NOW_DT)
    assert d.fields["factory_state"] == "failed" and "hook failed" in body(d, "error")


@pytest.mark.parametrize("has_work, target", [(True, "ready_for_pr"), (False, "awaiting_input")])
def test_stopped_run(has_work, target):
    d = pr.decide_run_end(row(factory_state="implementing"), run(),
                          RunOutcome("stopped", has_work=has_work, reason="stop requested"), RUNNER, NOW_DT)
    assert d.fields["factory_state"] == target and body(d, "response").startswith("Stopped as requested")


@pytest.mark.parametrize("final", ["done", "canceled"])
@pytest.mark.parametrize("status", ["completed", "failed", "interrupted", "stopped"])
def test_run_ending_after_the_issue_became_final_keeps_it_final(final, status):
    d = pr.decide_run_end(row(factory_state=final), run(), RunOutcome(status, has_work=True, reason="x"),
                          RUNNER, NOW_DT)
    assert d.fields == {"active_run_id": None} and d.outbox == ()


# ----------------------------------------------------------------------------- build_prompt
def _project(**kw):
    base = dict(id="app", repo_path=Path("/repo"), github_repo="acme/app", base_branch="develop",
                worktree_root=Path("/wt"), branch_prefix="app", issue_key_prefixes=("APP",), linear_team_keys=(),
                linear_team_ids=(), trusted_actors=pr.TrustedActors())
    base.update(kw)
    return pr.ProjectConfig(**base)


def test_build_prompt_contains_everything_the_agent_needs():
    issue = row(title="Add a greeting", description="Please add hello.txt with a friendly greeting.")
    msgs = [{"author": "Alice Smith", "body": "Use British spelling."}, {"author": None, "body": "And a test."}]
    text = pr.build_prompt(issue, run(prompt="please do it today"), _project(), "workspace-write", None, msgs)
    for needle in ("APP-1", "Add a greeting", "Please add hello.txt with a friendly greeting.",
                   "please do it today", "Alice Smith: Use British spelling.", "someone: And a test.",
                   "`app/APP-1-add-a-greeting`", "acme/app", "`develop`", "https://linear.app/x/issue/APP-1",
                   "Do not run `git commit`"):
        assert needle in text, needle
    assert "undefined" not in text and "None" not in text and "null" not in text


def test_build_prompt_with_sparse_issue_has_no_placeholders():
    issue = row(description="", url=None, pr_url=None)
    text = pr.build_prompt(issue, {"run_type": "implementation", "context": None}, _project(), "danger-full-access",
                           None, [])
    assert "(no description)" in text and "URL:" not in text and "Follow-up" not in text
    assert "undefined" not in text and "None" not in text and "null" not in text


def test_build_prompt_uses_the_repository_workflow_and_mentions_the_pr():
    text = pr.build_prompt(row(pr_number=12, pr_url="https://github.com/acme/app/pull/12"), run("review_fix"),
                           _project(), "workspace-write", "Run make check before finishing.", [])
    assert "Run make check before finishing." in text and "Do not run `git commit`" not in text
    assert "Pull request: #12 https://github.com/acme/app/pull/12" in text and "Run type: review fix" in text


# ----------------------------------------------------------------------------- branch and worktree names
HOSTILE_KEYS = ["APP-1", "../../etc", "APP-1/../../../tmp/x", "$(rm -rf /)", "`reboot`", "'; DROP TABLE issues;--",
                "..", ".", "", "-rf", "APP-1.lock", "APP 1\nrm", "@{-1}", "~root", "a" * 500, "ÄPP-1", "HEAD",
                "refs/heads/main", "APP-1..", "/abs/path", "a\\b"]
HOSTILE_TITLES = ["Add a greeting", "", "'\"`$(rm -rf /)`\"'", "../../etc/passwd", "x" * 2000, "ümlaut ✓ emoji 🎉",
                  "line\nbreak\ttab", ".lock", "refs/heads/x", "@{u}", "a..b", "-", "~^:?*[\\"]


def _valid_branch(name):
    return subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_branch_names_from_hostile_keys_and_titles_are_valid_and_inert(key):
    project = _project()
    for title in HOSTILE_TITLES:
        b = pr.branch_for(project, key, title)
        assert b.startswith("app/") and len(b) <= 120, b
        assert _valid_branch(b), (key, title, b)
        assert not set(b) & set(" \t\n$`'\";|&<>()*?[]\\~^:@{}"), b
        assert ".." not in b and "//" not in b and not b.endswith((".", "/", ".lock"))


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_worktree_paths_from_hostile_keys_stay_directly_under_the_root(key, tmp_path):
    root = tmp_path / "worktrees"
    project = _project(worktree_root=root)
    p = pr.worktree_for(project, key)
    assert p.parent == root.resolve()
    assert p.name not in ("", ".", "..") and not p.name.startswith((".", "-")) and len(p.name) <= 64
    assert not set(p.name) & set(" \t\n$`'\";|&<>()*?[]\\~^:@{}/")


def test_distinct_ordinary_keys_get_distinct_worktrees(tmp_path):
    project = _project(worktree_root=tmp_path)
    keys = ["APP-1", "APP-2", "APP-10", "OPS-1"]
    assert len({pr.worktree_for(project, k) for k in keys}) == len(keys)
    assert len({pr.branch_for(project, k, "same title") for k in keys}) == len(keys)


def test_api_use_projects_the_hourly_requests_from_recent_ticks():
    t0 = pr.parse_iso("2026-01-01T00:00:00.000Z")
    ticks = [{"started_at": pr.iso(t0 + dt.timedelta(seconds=5 * i)),
              "summary": json.dumps({"api_cost": {"linear_requests": 1 if i else 3, "github_requests": 0}})}
             for i in reversed(range(5))]                  # newest first, one every 5 s
    use = pr.api_use(ticks, {"linear": 5000, "github": None})
    assert use["interval_seconds"] == 5.0 and use["ticks"] == 5
    assert use["linear"] == {"requests_per_tick": 1.4, "projected_per_hour": 1008, "share_of_limit": 20}
    assert use["github"] == {"requests_per_tick": 0.0, "projected_per_hour": 0, "share_of_limit": None}
    assert pr.api_use([], {}) == {"ticks": 0, "interval_seconds": None}
    one = pr.api_use(ticks[:1], {"linear": 5000})          # one tick: no rate to project from
    assert one["linear"]["projected_per_hour"] is None and one["interval_seconds"] is None
