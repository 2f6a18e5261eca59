"""Runs, end to end: `patchrelay tick` launches a detached worker that drives the REAL Codex CLI
(`codex app-server`, talking to the scripted fake model) in a git worktree, then commits, pushes to the
bare origin and answers in the fake Linear. Faults (model errors, dead app-servers, dead workers, stalls),
steering and stopping, hostile titles, the prepare-worktree hook, secrets, and the run-related CLI
commands (run / stop / retry / report / events / worktree / open).

Assertions are on what a user sees: CLI output and exit codes, `show --json` / `report --json`, branches
and files on origin, activities in Linear. SQLite is only read, to poll cheaply and to find the pids a
test kills (or, for G-R5, to fake a worker that never started).
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import patchrelay
from conftest import APP_TOKEN
from fakes.model import FakeModel
from helpers import (BRANCH, acts, bodies, db, db_dump, db_exec, file_at, git, held, issue_row, logs,
                     remote_branches, runs, say, tool, wait_done)

GH_TOKEN_VALUE = "ghp_testtoken0000000000000000000000"   # what World.env() puts in GITHUB_TOKEN


# ----------------------------------------------------------------------------- helpers
def wait_until(what, predicate, world, timeout=30, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\nruns: {runs(world)}\n{logs(world)}")


def active_run(world, key="APP-1"):
    r = issue_row(world, key)
    return db(world, "SELECT * FROM runs WHERE id = ?", (r["active_run_id"],))[0] if r and r["active_run_id"] else None


def wait_running(world, model, gate, key="APP-1"):
    """Until the model holds a request at `gate` (a turn is in progress); returns that run's row."""
    try:
        model.wait_held(gate, timeout=30)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nruns: {runs(world)}\n{logs(world)}") from None
    return wait_until("the run's app-server pid", lambda: (lambda r: r if r and r["appserver_pid"] else None)(
        active_run(world, key)), world)


def alive(pid):
    """True while pid is a live (non-zombie) process."""
    return patchrelay.proc_start_time(pid) is not None


def types(world, session):
    return [t for t, _ in acts(world, session)]


def valid_branch(name):
    return subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0


def codex_env_of(pid):
    """Environment variable names and raw environ bytes of pid and its descendants (the codex wrapper,
    the native app-server and any tool processes)."""
    todo, seen, names, raw = [pid], set(), set(), b""
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            data = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        raw += data
        names |= {e.split(b"=", 1)[0].decode() for e in data.split(b"\0") if e}
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return names, raw


def rollout_has(world, marker):
    return any(marker in p.read_text(errors="replace")
               for p in (world.tmp / "codex-home" / "sessions").rglob("*.jsonl"))


# ----------------------------------------------------------------------------- the happy path
def test_delegated_issue_becomes_a_pushed_branch_a_report_and_one_linear_response(world):
    model = world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt with a greeting.")])
    issue, session = world.delegate()
    out = world.tick_subprocess().stdout
    assert "APP-1: launched run 1" in out, out
    s = wait_done(world)

    # git: the branch is on origin with the agent's file, one commit on top of main, by PatchRelay
    heads = remote_branches(world.bare)
    assert BRANCH in heads, heads
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    assert git(world.bare, "rev-list", "--count", f"main..{BRANCH}") == "1"
    msg = git(world.bare, "log", "-1", "--format=%B", BRANCH)
    assert msg.startswith("APP-1: Add a greeting") and "PatchRelay-Run: 1" in msg, msg

    # the run and the factory state
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert s["issue"]["branch"] == BRANCH
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(1, "completed")]
    assert s["runs"][0]["failure_reason"] is None and s["runs"][0]["thread_id"]
    # the model saw the issue and the request in the prompt
    first_user = "\n".join(FakeModel.user_texts(model.requests[0], include_context=False))
    assert "Linear issue APP-1: Add a greeting" in first_user and "please do it" in first_user

    # report, text and JSON
    rep = world.cli("report", "APP-1", check=0).stdout
    assert "implementation #1 completed" in rep, rep
    assert "echo hello > hello.txt" in rep and "(exit 0)" in rep, rep
    assert "changed: hello.txt" in rep, rep
    rj = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)
    run = rj["runs"][0]
    assert rj["issue"] == "APP-1" and run["status"] == "completed"
    assert [c["exit_code"] for c in run["report"]["commands"]] == [0]
    assert "echo hello > hello.txt" in run["report"]["commands"][0]["command"]
    assert run["report"]["changed_files"] == ["hello.txt"]
    assert run["report"]["messages"] == ["Added hello.txt with a greeting."]
    assert run["report"]["turns"] and run["report"]["duration_seconds"] > 0

    # Linear: the acknowledgement, "Started", exactly one response, in that order
    a = acts(world, session)
    assert [t for t, _ in a] == ["thought", "thought", "response"], a
    assert a[0][1].startswith("Picked up APP-1")
    assert a[1][1].startswith("Started the implementation run") and BRANCH in a[1][1]
    assert "Pushed 1 commit" in a[2][1] and BRANCH in a[2][1] and "Added hello.txt" in a[2][1]
    assert world.linear.sessions[session["id"]]["status"] == "complete"

    # the next tick opens the pull request (PatchRelay does, not the agent) and says so in Linear
    n_requests = len(model.requests)
    assert "APP-1: opened pull request #1" in world.tick_subprocess().stdout
    pr = world.github.pr("acme/app", 1)
    assert pr["title"] == "APP-1: Add a greeting" and pr["headRefName"] == BRANCH and pr["baseRefName"] == "main"
    assert "Added hello.txt with a greeting." in pr["body"] and "APP-1" in pr["body"]
    assert world.issue_state("APP-1") == "pr_open"
    a = acts(world, session)
    assert a[3][0] == "response" and a[3][1].startswith("Opened pull request #1: https://github.com/acme/app/pull/1")
    assert [u["url"] for u in world.linear.sessions[session["id"]]["externalUrls"]] == [pr["url"]]
    assert world.linear.state_of(issue)["name"] == "In Review"

    # more ticks change nothing: no duplicate activity or PR, no new run, no new request to the model
    world.tick_subprocess()
    world.tick_subprocess()
    assert types(world, session) == ["thought", "thought", "response", "response"]
    assert [r["id"] for r in runs(world)] == [1]
    assert len(model.requests) == n_requests
    assert len(world.github.prs("acme/app")) == 1
    s = world.show("APP-1")
    assert s["issue"]["factory_state"] == "pr_open" and s["pull_request"]["number"] == 1


def test_linear_messages_keep_their_order_when_tick_and_worker_publish_at_once(world):
    """The tick publishes the acknowledgement while the worker it just launched publishes "Started".
    With a slow Linear, the tick's send of the acknowledgement is still in flight when the worker
    publishes: the worker must not send the session's later messages ahead of it."""
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    issue, session = world.delegate()
    world.linear.hang_next(3, operation="agentActivityCreate")   # the first activity write (the ack) is slow
    world.tick_subprocess()
    wait_done(world)
    a = acts(world, session)
    assert [t for t, _ in a] == ["thought", "thought", "response"], a
    assert a[0][1].startswith("Picked up APP-1"), f"acknowledgement is not the first message: {a}"
    assert a[1][1].startswith("Started the implementation run"), a


def test_foreground_run_streams_progress_and_exits_0_on_success_and_1_on_failure(world):
    world.config["runner"]["paused"] = True
    model = world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."),
                             {"kind": "http_error", "status": 500, "message": "model overloaded"}])
    _, s1 = world.delegate()
    _, s2 = world.delegate(title="Second thing")
    world.tick_subprocess()
    assert [r["id"] for r in runs(world)] == []          # paused: tracked and acknowledged, nothing launched
    assert issue_row(world, "APP-1")["pending_run_type"] == "implementation"
    assert world.cli("report", "APP-1", check=0).stdout.strip() == "APP-1: no runs yet"
    for args, said in ((("worktree", "APP-1"), "has no worktree yet"),
                       (("open", "APP-1", "--print"), "has no branch yet (no run has started)")):
        p = world.cli(*args)
        assert p.returncode == 2 and said in p.stderr, (args, p.stderr)

    p = world.cli("run", "APP-1", timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    expect_in_order = ["APP-1: implementation run 1 on app/APP-1-add-a-greeting", "worktree ", "started thread ",
                       "turn ", "$ ", "agent: Added hello.txt.", "committed the agent's changes",
                       f"pushed {BRANCH}", "run 1 completed"]
    i = 0
    for line in lines:
        if i < len(expect_in_order) and expect_in_order[i] in line:
            i += 1
    assert i == len(expect_in_order), f"missing or out of order: {expect_in_order[i]!r}\n{p.stdout}"
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    assert world.issue_state("APP-1") == "ready_for_pr"
    assert types(world, s1) == ["thought", "thought", "response"]

    p = world.cli("run", "APP-2", timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "run 2 failed" in p.stdout, p.stdout
    s = world.show("APP-2")
    assert s["issue"]["factory_state"] == "failed"
    assert types(world, s2) == ["thought", "thought", "error"]

    # nothing to run on something that is not an issue key; a usage error
    p = world.cli("run", "not a key")
    assert p.returncode == 2 and "not an issue key" in p.stderr, p.stderr

    # an issue PatchRelay has never seen (no tick, no agent session) is fetched from Linear and run; with no
    # session to answer in, the outcome goes to the issue as a comment
    issue3 = world.linear.add_issue(world.team, "Third thing", description="Add third.txt", creator=world.alice)
    model.push(tool("echo third > third.txt"), say("Added third.txt."))
    p = world.cli("run", "APP-3", timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    s = world.show("APP-3")
    assert s["issue"]["factory_state"] == "ready_for_pr" and s["runs"][0]["trigger"] == "patchrelay run"
    assert file_at(world.bare, "app/APP-3-third-thing", "third.txt") == "third\n"
    comments = [c["body"] for c in world.linear.comments_for(issue3)]
    assert any(c.startswith("Implementation run completed") for c in comments), comments


def test_no_change_and_a_question_awaits_input_with_an_elicitation(world):
    question = "Should the greeting say 'hello' or 'hi'? I changed nothing yet."
    world.use_codex([say(question)])
    _, session = world.delegate(description="Add a greeting somewhere")
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "awaiting_input"
    assert [r["status"] for r in s["runs"]] == ["completed"]
    rep = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)["runs"][0]["report"]
    assert rep["changed_files"] == [] and rep["commands"] == [] and rep["messages"] == [question]
    a = acts(world, session)
    assert [t for t, _ in a] == ["thought", "thought", "elicitation"], a
    assert question in a[2][1] and "no changes" in a[2][1]
    assert world.linear.sessions[session["id"]]["status"] == "awaitingInput"
    # A run that changed nothing has nothing to push: origin gets no branch (an empty branch identical to
    # main is noise on GitHub, and a pull request from it cannot be opened).
    assert list(remote_branches(world.bare)) == ["main"], remote_branches(world.bare)


def test_follow_up_prompt_after_completion_runs_again_on_the_same_branch_and_thread(world):
    model = world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    world.tick_subprocess()
    s1 = wait_done(world)
    thread = s1["issue"]["thread_id"]
    first_head = remote_branches(world.bare)[BRANCH]
    model.push(tool("echo bye > bye.txt"), say("Added bye.txt too."))
    world.linear.add_prompt(session, world.alice, "please also add bye.txt")
    out = world.tick_subprocess().stdout
    assert "follow-up prompt -> implementation queued" in out and "launched run 2" in out, out
    s = wait_done(world)
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(2, "completed"), (1, "completed")]
    assert s["issue"]["factory_state"] == "ready_for_pr" and s["issue"]["thread_id"] == thread
    assert [(m["body"], m["delivery"]) for m in s["inbox"]] == [("please also add bye.txt",
                                                               "included in the run's prompt")]
    assert any("(reused)" in e["message"] for e in s["events"] if e["run_id"] == 2), s["events"]
    # the follow-up went to the model inside the resumed thread, after the first run's conversation
    last = FakeModel.user_texts(model.requests[-1], include_context=False)
    assert any("please also add bye.txt" in t for t in last) and any("Linear issue APP-1" in t for t in last[:1])
    # a second commit on top of the first, both files on origin
    assert git(world.bare, "rev-parse", f"{BRANCH}~1") == first_head
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n" and file_at(world.bare, BRANCH, "bye.txt") == "bye\n"
    rep = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)["runs"]
    assert [r["report"]["changed_files"] for r in rep] == [["bye.txt"], ["hello.txt"]]   # each run's own (G-R4)
    assert types(world, session).count("response") == 2


# ----------------------------------------------------------------------------- faults
def test_codex_that_cannot_start_fails_the_run_with_a_linear_error(world):
    world.config["codex"] = {"bin": str(world.tmp / "no-such-codex"), "home": str(world.tmp / "codex-home")}
    world.write_config()
    _, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "failed"
    reason = s["runs"][0]["failure_reason"]
    assert "codex.bin: cannot start" in reason and "no-such-codex" in reason, reason
    errors = bodies(world, session, "error")
    assert len(errors) == 1 and "codex.bin: cannot start" in errors[0]


def test_model_http_500_fails_the_run_with_a_linear_error_then_retry_runs_it_again(world):
    model = world.use_codex([{"kind": "http_error", "status": 500, "message": "upstream exploded"}])
    _, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "failed"
    assert [r["status"] for r in s["runs"]] == ["failed"]
    reason = s["runs"][0]["failure_reason"]
    assert reason and reason.startswith("turn failed"), reason   # Codex words a 500 as "high demand"
    errors = bodies(world, session, "error")
    assert len(errors) == 1 and errors[0].startswith("Implementation run failed:"), acts(world, session)
    assert world.linear.sessions[session["id"]]["status"] == "error"
    assert BRANCH not in remote_branches(world.bare)

    # a failed issue stays failed: more ticks start nothing
    world.tick_subprocess()
    assert len(runs(world)) == 1

    # retry: a bad type is a usage error (2); a good one queues, and the next tick runs it
    p = world.cli("retry", "APP-1", "--type", "bogus")
    assert p.returncode == 2, p.stdout + p.stderr
    assert world.issue_state("APP-1") == "failed"
    p = world.cli("retry", "APP-1", "--reason", "model is back", "--json", check=0)
    assert json.loads(p.stdout) == {"issue": "APP-1", "queued": "implementation", "reason": "model is back",
                                    "factory_state": "delegated"}
    model.push(tool("echo hello > hello.txt"), say("Added hello.txt."))
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(2, "completed"), (1, "failed")]
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    assert types(world, session) == ["thought", "thought", "error", "thought", "response"]

    # worktree / open / events
    wt = world.cli("worktree", "APP-1", "--cd", check=0).stdout.strip()
    assert wt == str((world.tmp / "worktrees" / "APP-1").resolve()) and Path(wt).is_dir()
    wj = json.loads(world.cli("worktree", "APP-1", "--json", check=0).stdout)
    assert wj["branch"] == BRANCH and wj["exists"] is True
    thread = s["issue"]["thread_id"]
    assert thread
    cmd = world.cli("open", "APP-1", "--print", check=0).stdout.strip()
    assert cmd.startswith(f"cd {wt} && CODEX_HOME="), cmd
    assert f" -C {wt} resume {thread}" in cmd and cmd.split(" && ", 1)[1].split()[1] == \
        world.config["codex"]["bin"], cmd
    ev = world.cli("events", "APP-1", check=0).stdout
    for needle in ("implementation queued", "run claimed", "worker ", "run failed", "queued by operator",
                   "run completed"):
        assert needle in ev, (needle, ev)
    doc = json.loads(world.cli("events", "APP-1", "--json", check=0).stdout)     # one JSON document
    assert doc["issue"] == "APP-1"
    evj = doc["events"]
    assert evj and all({"id", "at", "level", "kind", "message", "run_id"} <= set(e) for e in evj)
    assert [e["id"] for e in evj] == sorted(e["id"] for e in evj)


def test_app_server_killed_mid_turn_fails_the_run_naming_the_exit(world):
    model = world.use_codex([held("g", say("never delivered"))])
    _, session = world.delegate()
    world.tick_subprocess()
    run = wait_running(world, model, "g")
    os.killpg(run["appserver_pid"], signal.SIGKILL)
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "failed"
    assert [r["status"] for r in s["runs"]] == ["failed"]
    reason = s["runs"][0]["failure_reason"]
    assert "app-server exited" in reason, reason
    errors = bodies(world, session, "error")
    assert len(errors) == 1 and "app-server exited" in errors[0], acts(world, session)
    assert not alive(run["worker_pid"])


@pytest.mark.parametrize("budget", [2, 0])
def test_worker_killed_mid_turn_is_reconciled_by_the_next_tick(world, budget):
    world.config["runner"]["retry_budget"] = budget
    model = world.use_codex([held("g", say("never delivered"))])
    _, session = world.delegate()
    world.tick_subprocess()
    run = wait_running(world, model, "g")
    os.kill(run["worker_pid"], signal.SIGKILL)
    wait_until("the worker to die", lambda: not alive(run["worker_pid"]), world, timeout=10)
    model.push(tool("echo hello > hello.txt"), say("Added hello.txt."))
    out = world.tick_subprocess().stdout
    assert "run 1 worker gone; interrupted" in out, out
    assert not alive(run["appserver_pid"]), "reconcile must kill the app-server the dead worker left"
    s = wait_done(world)
    r1 = next(r for r in s["runs"] if r["id"] == 1)
    assert r1["status"] == ("interrupted" if budget else "failed"), r1      # past the budget it is failed
    assert "worker died" in r1["failure_reason"], r1
    if not budget:
        assert "retry budget of 0 used up" in r1["failure_reason"], r1
    if budget:
        assert s["issue"]["factory_state"] == "ready_for_pr"
        assert [(r["id"], r["status"]) for r in s["runs"]] == [(2, "completed"), (1, "interrupted")]
        assert s["runs"][0]["thread_id"] == r1["thread_id"]          # the relaunch resumed the thread
        assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
        a = acts(world, session)
        assert [t for t, _ in a] == ["thought", "thought", "thought", "thought", "response"], a
        assert "interrupted" in a[2][1] and "retry 1 of 2" in a[2][1], a
        assert s["issue"]["retries"] == 1
    else:
        assert s["issue"]["factory_state"] == "failed"
        assert [r["id"] for r in s["runs"]] == [1]
        errors = bodies(world, session, "error")
        assert len(errors) == 1 and "retry budget of 0 used up" in errors[0], acts(world, session)
        world.tick_subprocess()
        assert len(runs(world)) == 1


def test_turn_that_completed_after_its_worker_died_is_finished_by_reconcile(world):
    """The worker is frozen while the turn runs, the turn completes in the app-server, then the worker is
    killed. Reconcile reads the completed turn back and does what the worker would have: commit, push,
    report, respond. No second run."""
    model = world.use_codex([tool("echo hello > hello.txt"), held("g", say("Added hello.txt while alone."))])
    _, session = world.delegate()
    world.tick_subprocess()
    run = wait_running(world, model, "g")
    os.kill(run["worker_pid"], signal.SIGSTOP)
    try:
        model.open("g")
        wait_until("the turn to complete in the rollout", lambda: rollout_has(world, '"task_complete"'), world,
                   timeout=20)
    finally:
        os.kill(run["worker_pid"], signal.SIGKILL)
    wait_until("the worker to die", lambda: not alive(run["worker_pid"]), world, timeout=10)
    out = world.tick_subprocess().stdout
    assert "run 1 worker gone; completed" in out, out + logs(world)
    s = world.show("APP-1")
    assert s["issue"]["factory_state"] == "pr_open"        # the same tick's observe step opened the PR
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(1, "completed")]
    assert s["runs"][0]["summary"] == "Added hello.txt while alone."
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    rep = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)["runs"][0]["report"]
    assert rep["changed_files"] == ["hello.txt"]
    assert any("echo hello > hello.txt" in c["command"] for c in rep["commands"])
    a = acts(world, session)
    assert [t for t, _ in a] == ["thought", "thought", "response", "response"], a
    assert "Added hello.txt while alone." in a[2][1] and a[3][1].startswith("Opened pull request #1")


def test_stalled_turn_is_interrupted_and_fails_as_stalled(world):
    model = world.use_codex([{"kind": "hang", "seconds": 30}], stall_timeout=2)
    _, session = world.delegate()
    world.tick_subprocess()
    t0 = time.time()
    s = wait_done(world, timeout=30)
    assert time.time() - t0 < 20, "the stall timeout is 2 s"
    model.release()
    assert s["issue"]["factory_state"] == "failed"
    reason = s["runs"][0]["failure_reason"]
    assert s["runs"][0]["status"] == "failed" and "stalled" in reason, reason
    errors = bodies(world, session, "error")
    assert len(errors) == 1 and "stalled" in errors[0], acts(world, session)
    assert rollout_has(world, '"turn_aborted"')          # the turn was interrupted, not left running


# ----------------------------------------------------------------------------- steering and stopping
def test_follow_up_prompt_is_steered_into_the_live_turn(world):
    # Codex 0.169.0 answers a steer by sending the model a new request with the steered input (the held
    # one is dropped), so the script after the gate is what the model does once it has read the message.
    model = world.use_codex([held("g", say("Working on it.")), tool("echo bye > bye.txt"),
                             say("Added bye.txt.")])
    _, session = world.delegate()
    world.tick_subprocess()
    wait_running(world, model, "g")
    world.linear.add_prompt(session, world.alice, "also add bye.txt")
    world.tick_subprocess()

    def delivered():
        inbox = world.show("APP-1")["inbox"]
        return inbox if inbox and inbox[0]["delivered_at"] else None
    inbox = wait_until("the message to be steered", delivered, world, timeout=15, interval=0.3)
    assert [(m["kind"], m["body"], m["delivery"]) for m in inbox] == \
        [("prompt", "also add bye.txt", "steered into the running turn")]
    assert "Passing your message to the running agent." in bodies(world, session, "thought")
    model.open("g")
    s = wait_done(world)
    assert len(model.requests) >= 2
    steered = [t for t in FakeModel.user_texts(model.requests[1]) if "also add bye.txt" in t]
    assert steered and "Alice Smith" in steered[0], FakeModel.user_texts(model.requests[1])
    assert not any("also add bye.txt" in t for t in FakeModel.user_texts(model.requests[0]))
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert [r["status"] for r in s["runs"]] == ["completed"]
    assert file_at(world.bare, BRANCH, "bye.txt") == "bye\n"
    assert types(world, session).count("response") == 1


def test_stop_interrupts_the_live_turn_and_awaits_input(world):
    model = world.use_codex([held("g", say("never delivered"))])
    _, session = world.delegate()
    world.tick_subprocess()
    wait_running(world, model, "g")
    # while the run is active, neither a foreground run nor a retry may start a second one
    p = world.cli("run", "APP-1")
    assert p.returncode == 2 and "run 1 is already active" in p.stderr, p.stderr
    p = world.cli("retry", "APP-1")
    assert p.returncode == 2 and "is active" in p.stderr, p.stderr
    p = world.cli("open", "APP-1")
    assert p.returncode == 2 and "is active" in p.stderr, p.stderr
    p = world.cli("stop", "APP-1", check=0)
    assert "APP-1: stop requested (run 1 will be interrupted)" in p.stdout
    s = wait_done(world, timeout=30)
    assert [(r["status"], r["failure_reason"]) for r in s["runs"]] == [("stopped", "stopped with `patchrelay stop`")]
    assert s["issue"]["factory_state"] == "awaiting_input"       # no work on the branch
    assert [(m["kind"], m["delivery"]) for m in s["inbox"]] == [("stop", "interrupted the turn")]
    assert any(e["kind"] == "stop" and e["run_id"] == 1 for e in s["events"]), s["events"]
    assert rollout_has(world, '"turn_aborted"') and rollout_has(world, '"interrupted"')
    a = acts(world, session)
    assert [t for t, _ in a] == ["thought", "thought", "response"], a
    assert a[2][1].startswith("Stopped as requested"), a
    assert len(model.requests) == 1                 # the turn ended; nothing more was asked of the model
    p = world.cli("stop", "APP-1")
    assert p.returncode == 2 and "nothing is running or pending" in p.stderr
    world.tick_subprocess()
    assert len(runs(world)) == 1 and types(world, session).count("response") == 1


@pytest.mark.parametrize("how", ["linear stop signal", "undelegated", "moved to Done"])
def test_stop_from_linear_interrupts_the_live_turn(world, how):
    model = world.use_codex([held("g", say("never delivered"))])
    issue, session = world.delegate()
    world.tick_subprocess()
    wait_running(world, model, "g")
    if how == "linear stop signal":
        world.linear.add_prompt(session, world.alice, "stop", signal="stop")
    elif how == "undelegated":
        world.linear.update_issue(issue, delegate=None)
    else:
        world.linear.update_issue(issue, state="Done")
    world.tick_subprocess()
    s = wait_done(world, timeout=30)
    assert [r["status"] for r in s["runs"]] == ["stopped"], s["runs"]
    assert [(m["kind"], m["delivery"]) for m in s["inbox"]] == [("stop", "interrupted the turn")]
    assert rollout_has(world, '"turn_aborted"')
    assert len(model.requests) == 1
    if how == "moved to Done":
        assert s["issue"]["factory_state"] == "done"
    else:
        assert s["issue"]["factory_state"] == "awaiting_input"
        assert bodies(world, session, "response")[-1].startswith("Stopped as requested")
    world.tick_subprocess()
    assert len(runs(world)) == 1


def test_stop_after_the_agent_changed_files_keeps_the_work(world):
    model = world.use_codex([tool("echo hello > hello.txt"), held("g", say("never delivered"))])
    _, session = world.delegate()
    world.tick_subprocess()
    wait_running(world, model, "g")
    world.cli("stop", "APP-1", check=0)
    s = wait_done(world, timeout=30)
    assert [r["status"] for r in s["runs"]] == ["stopped"]
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    resp = bodies(world, session, "response")
    assert len(resp) == 1 and "Stopped as requested" in resp[0] and BRANCH in resp[0], resp


# ----------------------------------------------------------------------------- claimed, never started (G-R5)
def _claim_without_worker(world):
    """What a tick that died between claiming and spawning leaves: a claimed run row and no worker."""
    world.config["runner"]["paused"] = True
    world.write_config()
    world.tick_subprocess()
    cfg = patchrelay.load_config(str(world.config_path))
    store = patchrelay.Store(cfg.database_path, url=cfg.database_url)
    try:
        row = store.issue_by_key("APP-1")
        run_id = patchrelay.claim(cfg, store, row["id"], cfg.project(row["project_id"]))
    finally:
        store.close()
    assert run_id == 1
    world.config["runner"]["paused"] = False
    world.write_config()
    return run_id


def _set_run(world, run_id, **fields):
    db_exec(world.state, f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
            [*fields.values(), run_id])


def _assert_relaunched_and_completed(world, session):
    s = wait_done(world)
    assert [(r["id"], r["status"]) for r in s["runs"]] == [(2, "completed"), (1, "interrupted")], s["runs"]
    assert s["runs"][1]["failure_reason"] == "worker exited before the turn started"
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\n"
    assert types(world, session).count("response") == 1


def test_claimed_run_whose_worker_died_before_starting_is_relaunched(world):
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    run_id = _claim_without_worker(world)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _set_run(world, run_id, worker_pid=dead.pid, worker_started="1")
    out = world.tick_subprocess().stdout
    assert "run 1 never started; requeued" in out and "launched run 2" in out, out
    _assert_relaunched_and_completed(world, session)


def test_claimed_run_without_a_worker_pid_is_left_alone_briefly_then_relaunched(world):
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    run_id = _claim_without_worker(world)
    world.tick_subprocess()                                 # a claim this fresh may be a spawn in progress
    assert [(r["id"], r["status"]) for r in runs(world)] == [(1, "claimed")]
    _set_run(world, run_id, claimed_at=patchrelay.iso(patchrelay.utcnow() - patchrelay.dt.timedelta(seconds=60)))
    out = world.tick_subprocess().stdout
    assert "run 1 never started; requeued" in out, out
    _assert_relaunched_and_completed(world, session)


# ----------------------------------------------------------------------------- hostile input
def test_hostile_title_and_team_key_make_valid_branches_and_execute_nothing(world):
    marker = Path(f"/tmp/patchrelay-pwned-{uuid.uuid4().hex}")
    title = (f"../../etc/passwd \"quoted\" 'single' $(touch {marker}) `touch {marker}` ; rm -rf ~ "
             + "long " * 400)
    assert len(title) > 2000
    evil = world.linear.add_team("E$(X)")
    world.config["projects"][0]["issue_key_prefixes"] = ["APP", "E$(X)"]
    world.use_codex([tool("echo hi > hi.txt"), say("Done."), tool("echo hi > hi.txt"), say("Done.")])
    _, s1 = world.delegate(title=title, description=f"$(touch {marker}) and `touch {marker}`")
    issue2 = world.linear.add_issue(evil, f"../{title[:80]}", description="x", delegate=world.app,
                                    creator=world.alice)
    s2 = world.linear.add_session(issue2, world.alice, world.app, body=f"$(touch {marker})")
    world.write_config(runner={**world.config["runner"], "max_concurrent_runs": 1})
    world.tick_subprocess()
    wait_done(world, "APP-1")
    world.tick_subprocess()
    wait_done(world, issue2["identifier"])

    root = (world.tmp / "worktrees").resolve()
    heads = remote_branches(world.bare)
    for key, session in (("APP-1", s1), (issue2["identifier"], s2)):
        # a key no person could type (`show` refuses it): read the row itself
        s = {"issue": issue_row(world, key), "runs": runs(world)}
        branch, wt = s["issue"]["branch"], Path(s["issue"]["worktree"])
        assert valid_branch(branch), branch
        assert branch.startswith("app/") and len(branch) < 120, branch
        assert wt.parent == root and wt.is_dir(), wt
        assert s["issue"]["factory_state"] in ("ready_for_pr", "pr_open"), (key, s["runs"])
        assert branch in heads and file_at(world.bare, branch, "hi.txt") == "hi\n"
        assert types(world, session)[:3] == ["thought", "thought", "response"]
        number = (s["issue"].get("pr") or {}).get("number") if "pr" in s["issue"] else s["issue"]["pr_number"]
        pr = world.github.pr("acme/app", number) if number else None
        assert pr is None or (pr["headRefName"] == branch and pr["title"].startswith(key)), pr
    msg = git(world.bare, "log", "-1", "--format=%s", world.show("APP-1")["issue"]["branch"])
    assert msg.startswith("APP-1: ../../etc/passwd \"quoted\"") and len(msg) < 100, msg
    assert not marker.exists(), "a title, description or prompt was executed by a shell"
    assert sorted(p.name for p in root.iterdir()) == sorted({Path(issue_row(world, k)["worktree"]).name
                                                             for k in ("APP-1", issue2["identifier"])})


# ----------------------------------------------------------------------------- prepare-worktree hook
def test_checking_whether_a_finished_child_is_alive_keeps_its_exit_status():
    """A hook that exits before the worker records its start time is a zombie by then: looking at it must
    not reap it, or Popen reads exit status 0 and a failing hook passes (seen under parallel load)."""
    p = subprocess.Popen(["sh", "-c", "exit 3"])
    deadline = time.time() + 10
    while Path(f"/proc/{p.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.time() < deadline, "the child never exited"
        time.sleep(0.01)
    assert patchrelay.proc_start_time(p.pid) is None          # a zombie is not alive...
    assert not patchrelay.process_alive(p.pid, "anything")
    assert p.wait(timeout=5) == 3                             # ...and its status is still its own


def test_watch_reaps_the_workers_it_launched():
    p = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
    patchrelay._SPAWNED.append(p)
    patchrelay.reap_workers()
    assert p in patchrelay._SPAWNED                           # still running: kept
    p.stdin.close()                                           # lets it exit
    deadline = time.time() + 10
    while Path(f"/proc/{p.pid}").exists() and p in patchrelay._SPAWNED:
        assert time.time() < deadline, "the child was never reaped"
        patchrelay.reap_workers()
        time.sleep(0.01)
    assert p not in patchrelay._SPAWNED and p.returncode == 0 and not Path(f"/proc/{p.pid}").exists()


def _commit_hook(world, script):
    hook = world.repo / ".patchrelay" / "hooks" / "prepare-worktree"
    hook.parent.mkdir(parents=True)
    hook.write_text(script)
    hook.chmod(0o755)
    git(world.repo, "add", ".patchrelay")
    git(world.repo, "commit", "-q", "-m", "prepare-worktree hook")


def test_prepare_worktree_hook_gets_the_run_variables_and_no_tokens(world):
    out = world.tmp / "hook-env.txt"
    _commit_hook(world, f"#!/bin/sh\n{{ pwd; env; }} > '{out}'\necho 'hook: prepared' >&2\n")
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    world.delegate()
    world.cli("tick", env={"GH_TOKEN": "gho_secretghtoken000000000000000000000"}, check=0)
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "ready_for_pr"
    lines = out.read_text().splitlines()
    wt = str((world.tmp / "worktrees" / "APP-1").resolve())
    assert lines[0] == wt                                     # run in the worktree
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert env["PATCHRELAY_ISSUE_KEY"] == "APP-1"
    assert env["PATCHRELAY_BRANCH"] == BRANCH
    assert env["PATCHRELAY_RUN_TYPE"] == "implementation"
    assert env["PATCHRELAY_WORKTREE"] == wt
    for name in ("LINEAR_API_KEY", "GITHUB_TOKEN", "GH_TOKEN"):
        assert name not in env, name
    text = out.read_text()
    assert APP_TOKEN not in text and GH_TOKEN_VALUE not in text and "gho_secretghtoken" not in text
    assert file_at(world.bare, BRANCH, "hook-env.txt") is None


def test_failing_prepare_worktree_hook_fails_the_run_with_its_stderr(world):
    _commit_hook(world, "#!/bin/sh\necho 'installing deps' >&2\necho 'npm ERR! lockfile is out of date' >&2\n"
                        "exit 3\n")
    model = world.use_codex([tool("echo hello > hello.txt"), say("never")])
    _, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "failed"
    reason = s["runs"][0]["failure_reason"]
    assert s["runs"][0]["status"] == "failed"
    assert "prepare-worktree hook failed (exit 3)" in reason and "npm ERR! lockfile is out of date" in reason, reason
    errors = bodies(world, session, "error")
    assert len(errors) == 1 and "npm ERR! lockfile is out of date" in errors[0], acts(world, session)
    assert model.requests == []                            # Codex never started
    assert BRANCH not in remote_branches(world.bare)


def _changed_on_origin(world):
    return set(git(world.bare, "diff", "--name-only", f"main..{BRANCH}").split())


def _hello_run(world):
    """One implementation run that adds hello.txt; returns show --json and the run's git event text."""
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "ready_for_pr", s["runs"]
    return s, " ".join(e["message"] for e in s["events"] if e["kind"] == "git")


def test_leftovers_of_a_worker_killed_while_preparing_the_worktree_are_cleared(world):
    """A worker killed inside `git worktree add` leaves a half-filled, locked partial worktree holding the
    branch, and a killed fetch leaves a ref lock: the next run clears both and starts from a full checkout."""
    tracked = git(world.repo, "ls-files").split()
    partial = world.tmp / "worktrees" / ".APP-1.partial"
    git(world.repo, "fetch", "-q", "origin")
    git(world.repo, "worktree", "add", "-q", "--no-track", "-b", BRANCH, partial, "origin/main")
    git(world.repo, "worktree", "lock", partial)               # `worktree add` holds this lock while it runs
    for name in tracked:                                       # the checkout was cut short
        (partial / name).unlink()
    lock = world.repo / ".git" / "refs" / "remotes" / "origin" / "main.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    s, how = _hello_run(world)
    assert not partial.exists() and not lock.exists()
    assert "checked out local branch" in how
    for name in tracked:
        assert (world.tmp / "worktrees" / "APP-1" / name).exists(), name
    assert _changed_on_origin(world) == {"hello.txt"}          # nothing committed as deleted
    assert str(partial) not in git(world.repo, "worktree", "list")


def test_a_worktree_moved_into_place_but_not_yet_repaired_is_repaired_and_reused(world):
    """Killed between the rename of the finished checkout and `git worktree repair`: git still lists the
    partial path; the next run repairs the moved worktree instead of removing it as a leftover."""
    partial = world.tmp / "worktrees" / ".APP-1.partial"
    path = world.tmp / "worktrees" / "APP-1"
    git(world.repo, "fetch", "-q", "origin")
    git(world.repo, "worktree", "add", "-q", "--no-track", "-b", BRANCH, partial, "origin/main")
    (partial / "notes.txt").write_text("work in progress\n")     # the worktree's own state must survive
    os.rename(partial, path)
    s, how = _hello_run(world)
    assert "(reused)" in how
    assert _changed_on_origin(world) == {"hello.txt", "notes.txt"}
    assert str(partial) not in git(world.repo, "worktree", "list")


def test_another_issues_run_repairs_a_moved_worktree_instead_of_removing_its_records(world):
    """APP-7's worker was killed between the rename and the repair; APP-1's run (same repository, same lock)
    must not take APP-7's moved worktree for a leftover: it repairs it."""
    partial = world.tmp / "worktrees" / ".APP-7.partial"
    other = world.tmp / "worktrees" / "APP-7"
    git(world.repo, "fetch", "-q", "origin")
    git(world.repo, "worktree", "add", "-q", "--no-track", "-b", "app/APP-7-other", partial, "origin/main")
    os.rename(partial, other)
    _hello_run(world)
    assert git(other, "rev-parse", "--abbrev-ref", "HEAD") == "app/APP-7-other"       # still a worktree
    listed = git(world.repo, "worktree", "list", "--porcelain")
    assert f"worktree {other.resolve()}" in listed and str(partial) not in listed, listed


def test_a_worktree_with_gits_placeholder_head_is_rebuilt_not_reused(world):
    path = world.tmp / "worktrees" / "APP-1"
    git(world.repo, "worktree", "add", "-q", "--detach", path, "HEAD")
    (world.repo / ".git" / "worktrees" / "APP-1" / "HEAD").write_text("0" * 40 + "\n")   # a checkout cut short
    s, how = _hello_run(world)
    assert "created" in how
    assert _changed_on_origin(world) == {"hello.txt"}


def test_a_hook_never_runs_when_its_worker_dies_before_recording_it(world):
    """The worker dies right after starting the hook's process, before the pid is on record (where reconcile
    would find it): the hook must not run at all, and nothing is left behind."""
    ran = world.tmp / "hook-ran"
    pid_file = world.tmp / "hook-pid"
    _commit_hook(world, f"#!/bin/sh\ntouch '{ran}'\nsleep 30\n")
    child = (f"import os, sys; sys.path.insert(0, {str(Path(patchrelay.__file__).parent)!r}); import patchrelay as pr; "
             f"cfg = pr.load_config({str(world.config_path)!r}); "
             f"pr.run_hook(cfg.projects[0], cfg, 'prepare-worktree', pr.Path({str(world.repo)!r}), {{}}, "
             f"lambda pid, st: (open({str(pid_file)!r}, 'w').write(str(pid)), os._exit(9)))")
    p = subprocess.run([sys.executable, "-c", child], env=world.env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 9, p.stderr
    pid = int(pid_file.read_text())
    wait_until("the hook's shell to exit", lambda: patchrelay.proc_start_time(pid) is None, world, timeout=10)
    time.sleep(0.5)
    assert not ran.exists(), "the hook ran although its worker died before recording it"


# ----------------------------------------------------------------------------- secrets
def test_codex_never_sees_the_tokens_and_nothing_stores_them(world):
    gh_cli_token = "gho_othertoken1111111111111111111111"
    model = world.use_codex([tool("env > env.txt"), held("g", say("Wrote env.txt."))])
    _, session = world.delegate()
    world.cli("tick", env={"GH_TOKEN": gh_cli_token}, check=0)
    run = wait_running(world, model, "g")
    names, raw = codex_env_of(run["appserver_pid"])
    model.open("g")
    assert "CODEX_HOME" in names and "FAKE_API_KEY" in names        # we did read the app-server's environment
    for name in ("LINEAR_API_KEY", "GITHUB_TOKEN", "GH_TOKEN"):
        assert name not in names, name
    for value in (APP_TOKEN, GH_TOKEN_VALUE, gh_cli_token):
        assert value.encode() not in raw

    s = wait_done(world)
    assert s["issue"]["factory_state"] == "ready_for_pr"
    env_txt = file_at(world.bare, BRANCH, "env.txt")
    assert env_txt and "PWD=" in env_txt
    for needle in ("LINEAR_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", APP_TOKEN, GH_TOKEN_VALUE, gh_cli_token):
        assert needle not in env_txt, needle

    prompt = db(world, "SELECT prompt FROM runs WHERE id = 1")[0]["prompt"]
    assert prompt and "Linear issue APP-1" in prompt
    dump = db_dump(world.state)
    outputs = [world.cli(*a, check=0).stdout for a in (("show", "APP-1", "--json"), ("report", "APP-1", "--json"),
                                                       ("report", "APP-1"), ("events", "APP-1"), ("status",))]
    for where, text in [("prompt", prompt), ("database", dump), ("logs", logs(world))] + \
            [(f"cli {i}", o) for i, o in enumerate(outputs)]:
        for value in (APP_TOKEN, GH_TOKEN_VALUE, gh_cli_token):
            assert value not in text, (where, value)
