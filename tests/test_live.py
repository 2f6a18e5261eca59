"""Seeing the agent work and the newer operator commands, through the real CLI against real git, the real
Codex CLI and the fake Linear/GitHub/model: `live` (and `--follow`) while a command runs, `feed` and its
filters, `logs`, `report --run/--type/--prompt`, the PATCHRELAY_STAGE hook variable, `open` repairing a
removed worktree and an unreadable thread, edited Linear comments, `watch` reloading its config, and
codex.shell / codex.base_instructions.
"""
import json
import re
import shutil
import signal
import subprocess
import threading
import time

from helpers import (BRANCH, db, git, logs, pause, remote_branches, runs, say, show, tick_inproc, tool,
                     wait_done)


def gated(go):
    """A command that prints three lines, then waits (at most 60 s) until the file `go` exists."""
    return (f"for i in 1 2 3; do echo line $i; done; n=0; while [ ! -e {go} ] && [ $n -lt 600 ]; "
            "do sleep 0.1; n=$((n+1)); done; echo finished")


def feed(world, *args):
    """`patchrelay feed --json ARGS` as a list of events."""
    p = world.cli("feed", "--json", *args, check=0)
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def one_line_error(p, *needles):
    """A usage error: exit 2, one line on stderr naming the problem, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def as_a_terminal_would():
    """Ctrl-C reaches a command started from a shell: SIGINT at its default and not blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Reader:
    """Collects a pipe's lines in a thread (so a test can wait for a line without blocking forever)."""

    def __init__(self, pipe):
        self.lines, self._lock = [], threading.Lock()
        self._t = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._t.start()

    def _read(self, pipe):
        for line in iter(pipe.readline, ""):
            with self._lock:
                self.lines.append(line)

    @property
    def text(self):
        with self._lock:
            return "".join(self.lines)

    def wait_for(self, needle, timeout, start=0):
        """Until `needle` appears in the text from character `start` on; returns the text."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.text[start:]:
                return self.text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not seen within {timeout}s; output so far:\n{self.text}")

    def join(self, timeout=10):
        self._t.join(timeout)


def finished_run(world, script=None, **codex):
    """APP-1 delegated, one implementation run launched and finished (pushes hello.txt): show --json."""
    world.use_codex(script or [tool("echo hello > hello.txt"), say("Added hello.txt.")], **codex)
    world.delegate()
    tick_inproc(world)
    return finished(world)


def finished(world, n=1):
    """Once APP-1's runs have ended, all completed (n of them): show --json."""
    try:
        s = wait_done(world, timeout=90)
    except json.JSONDecodeError:        # `show --json` failed: say how
        world.cli("show", "APP-1", "--json", check=0)
        raise
    assert [r["status"] for r in s["runs"]] == ["completed"] * n, f"{s['runs']}\n{logs(world)}"
    return s


# ----------------------------------------------------------------------------- live, feed, logs
def test_live_shows_the_running_command_and_feed_and_logs_show_what_the_agent_did(world):
    go = world.tmp / "go"
    world.use_codex([tool(gated(go)) | {"yield_time_ms": 30000}, say("Done.")])
    ops = world.linear.add_team("OPS")                         # a delegation no project routes: a warn event
    elsewhere = world.linear.add_issue(ops, "Elsewhere", delegate=world.app, creator=world.alice)
    world.linear.add_session(elsewhere, world.alice, world.app, body="please")
    world.delegate()
    tick_inproc(world)
    follower = subprocess.Popen(world.cli_argv("live", "APP-1", "--follow"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=world.env())
    followed = Reader(follower.stdout)
    try:
        # while the command runs (it waits for `go`), `live --json` shows it running, with what it printed
        def running():
            d = json.loads(world.cli("live", "APP-1", "--json", check=0).stdout)
            assert d["run"] is not None and d["run"]["id"] == 1, d
            assert d["run"]["active"], f"the run ended before `live` showed its command: {d}\n{logs(world)}"
            return d if d["command"] and "for i in" in d["command"] and d["exit_code"] is None \
                and "line 3" in d["output"] else None
        d = world.wait_for(running, timeout=60, interval=0.2, what="`live --json` to show the running command")
        assert d["run"]["type"] == "implementation" and d["run"]["status"] == "running", d
        assert "line 1\nline 2\nline 3\n" in d["output"] and "finished" not in d["output"], d["output"]
        assert d["run"]["turn_age_seconds"] is not None and d["run"]["turn_age_seconds"] >= 0, d
        live = world.show("APP-1")["live"]
        assert live and live["run"] == 1 and "for i in" in live["command"] and live["exit_code"] is None, live
        followed.wait_for("  | line 3", timeout=30)
        assert "(running)" in followed.text, followed.text
        assert follower.poll() is None                            # still following the running turn
        go.touch()

        s = finished(world)
        assert s["live"] is None                                  # no active run: no live view in show
        follower.wait(timeout=20)                                 # --follow ends by itself with the run
        err = follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    followed.join()
    out = followed.text
    assert follower.returncode == 0 and err == "", (follower.returncode, err)
    assert "APP-1  Add a greeting" in out and "run 1 (implementation) running" in out, out
    last = out.rstrip().split("\n\n")[-1]                      # the last screen: how the run ended
    assert "run 1 (implementation) completed" in last and "agent: Done." in last and "(exit 0)" in last, out

    # after the run: `live` shows how its last command ended
    d = json.loads(world.cli("live", "APP-1", "--json", check=0).stdout)
    assert d["run"]["active"] is False and d["run"]["status"] == "completed" and d["exit_code"] == 0, d
    assert "line 3" in d["output"] and "finished" in d["output"] and d["message"] == "Done.", d
    assert any(a.startswith("$ ") and "for i in" in a for a in d["agent"]) and "agent: Done." in d["agent"], d

    # feed: the run's agent events, in order, with the unrouted warning of no issue
    events = feed(world, "--limit", "500")
    agent = [e for e in events if e["kind"] == "agent" and e["run_id"] == 1]
    cmds = [e["message"] for e in agent if e["message"].startswith("$ ") and "for i in" in e["message"]]
    assert len(cmds) == 1 and "(exit 0)" in cmds[0], agent
    assert [e["message"] for e in agent][-1] == "agent: Done.", agent
    assert all(e["issue_key"] == "APP-1" and e["project_id"] == "app" for e in agent), agent
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert any(e["kind"] == "unrouted" and e["level"] == "warn" for e in events), events

    only_agent = feed(world, "--kind", "agent", "--limit", "500")
    assert only_agent and {e["kind"] for e in only_agent} == {"agent"}
    assert [e["id"] for e in only_agent] == [e["id"] for e in events if e["kind"] == "agent"]
    mine = feed(world, "--issue", "APP-1", "--limit", "500")
    assert mine and {e["issue_key"] for e in mine} == {"APP-1"} and {"agent", "run"} <= {e["kind"] for e in mine}
    assert len(mine) < len(events)                            # the unrouted delegation's events are left out
    warn = feed(world, "--level", "warn", "--limit", "500")
    assert warn and {e["level"] for e in warn} <= {"warn", "error"}, warn
    assert any(e["kind"] == "unrouted" for e in warn)
    text = world.cli("feed", "--kind", "agent", check=0).stdout
    assert "agent: Done." in text and "APP-1" in text, text

    # logs: the worker's log of the (last) run; a run the issue does not have is one line, exit 2
    p = world.cli("logs", "APP-1", check=0)
    assert "for i in" in p.stdout and "agent: Done." in p.stdout, p.stdout
    assert world.cli("logs", "APP-1", "--run", "1", check=0).stdout == p.stdout
    one_line_error(world.cli("logs", "APP-1", "--run", "999"), "999")


# ----------------------------------------------------------------------------- report filters
def test_report_filters_by_run_and_type_and_live_and_logs_default_to_the_last_run(world):
    finished_run(world)
    rj = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)
    assert [r["id"] for r in rj["runs"]] == [1]
    run = rj["runs"][0]
    assert run["prompt"] and "APP-1" in run["prompt"], run["prompt"]
    assert isinstance(run["report"]["tool_calls"], list), run["report"]
    assert run["report"]["commands"] and run["report"]["commands"][0]["exit_code"] == 0

    # a second run of the issue
    world.model.push(tool("echo bye > bye.txt"), say("Added bye.txt."))
    world.cli("retry", "APP-1", "--reason", "one more", check=0)
    tick_inproc(world)
    finished(world, n=2)

    rj = json.loads(world.cli("report", "APP-1", "--json", check=0).stdout)
    assert sorted(r["id"] for r in rj["runs"]) == [1, 2]
    assert all(r["prompt"] and isinstance(r["report"]["tool_calls"], list) for r in rj["runs"]), rj
    for n, file in ((1, "hello.txt"), (2, "bye.txt")):
        only = json.loads(world.cli("report", "APP-1", "--run", n, "--json", check=0).stdout)
        assert [r["id"] for r in only["runs"]] == [n] and only["runs"][0]["report"]["changed_files"] == [file], only
    none = json.loads(world.cli("report", "APP-1", "--type", "ci_repair", "--json", check=0).stdout)
    assert none == {"issue": "APP-1", "runs": []}
    impl = json.loads(world.cli("report", "APP-1", "--type", "implementation", "--json", check=0).stdout)
    assert sorted(r["id"] for r in impl["runs"]) == [1, 2]

    p = world.cli("report", "APP-1", "--run", "999")
    one_line_error(p, "APP-1", "999")
    assert p.stdout == ""

    text = world.cli("report", "APP-1", "--prompt", check=0).stdout
    assert "implementation #1 completed" in text and "implementation #2 completed" in text, text
    assert text.count("  prompt:\n") == 2, text
    assert f"    {run['prompt'].splitlines()[0]}" in text, text
    assert "prompt:" not in world.cli("report", "APP-1", check=0).stdout
    assert "prompt:" in world.cli("report", "APP-1", "--run", "2", "--prompt", check=0).stdout

    # without an active run, `live` and `logs` show the issue's last run (2), not its first
    d = json.loads(world.cli("live", "APP-1", "--json", check=0).stdout)
    assert d["run"]["id"] == 2 and d["message"] == "Added bye.txt.", d
    assert "run 2 (implementation) completed" in world.cli("live", "APP-1", check=0).stdout
    last_log = world.cli("logs", "APP-1", check=0).stdout
    assert "bye.txt" in last_log and last_log == world.cli("logs", "APP-1", "--run", "2", check=0).stdout
    assert "echo hello" in world.cli("logs", "APP-1", "--run", "1", check=0).stdout


# ----------------------------------------------------------------------------- hooks
def test_prepare_worktree_hook_sees_patchrelay_stage(world):
    out = world.tmp / "hook-env.txt"
    hook = world.repo / ".patchrelay" / "hooks" / "prepare-worktree"
    hook.parent.mkdir(parents=True)
    hook.write_text(f"#!/bin/sh\nenv | grep PATCHRELAY_ > '{out}'\n")
    hook.chmod(0o755)
    git(world.repo, "add", ".patchrelay")
    git(world.repo, "commit", "-q", "-m", "prepare-worktree hook")
    git(world.repo, "push", "-q", "origin", "HEAD:main")
    finished_run(world)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env.get("PATCHRELAY_STAGE") == "implementation", env
    assert env.get("PATCHRELAY_RUN_TYPE") == "implementation", env
    assert env.get("PATCHRELAY_ISSUE_KEY") == "APP-1", env


# ----------------------------------------------------------------------------- open
def test_open_rebuilds_a_removed_worktree_and_hands_off_when_the_thread_is_gone(world):
    s = finished_run(world)
    thread = s["issue"]["thread_id"]
    wt = world.tmp / "worktrees" / "APP-1"
    assert thread and wt.is_dir()
    pushed = remote_branches(world.bare)[BRANCH]
    assert pushed == git(world.bare, "rev-parse", BRANCH)

    shutil.rmtree(wt)
    git(world.repo, "worktree", "prune")
    o = json.loads(world.cli("open", "APP-1", "--json", check=0).stdout)
    assert o["issue"] == "APP-1" and o["thread_id"] == thread
    assert wt.is_dir() and o["worktree"] == str(wt.resolve()), o
    assert git(wt, "rev-parse", "--abbrev-ref", "HEAD") == BRANCH
    assert git(wt, "rev-parse", "HEAD") == pushed
    assert (wt / "hello.txt").read_text() == "hello\n"
    assert any("rebuilt" in r for r in o["repaired"]), o["repaired"]
    assert o["argv"][0] == world.config["codex"]["bin"] and o["argv"][-2:] == ["resume", thread], o["argv"]
    assert any(e["kind"] == "git" and "rebuilt" in e["message"] for e in world.show("APP-1")["events"])

    shutil.rmtree(world.tmp / "codex-home" / "sessions")      # the thread can no longer be read
    o2 = json.loads(world.cli("open", "APP-1", "--json", check=0).stdout)
    assert "resume" not in o2["argv"] and o2["thread_id"] is None, o2
    assert not any("rebuilt" in r for r in o2["repaired"]) and any(thread in r for r in o2["repaired"]), o2
    handoff = o2["argv"][-1]
    assert "APP-1" in handoff and "Earlier runs said" in handoff and "Added hello.txt." in handoff, handoff
    assert "hello.txt" in handoff.split("Earlier runs said", 1)[1]


# ----------------------------------------------------------------------------- edited comments
def test_an_edited_comment_follows_as_a_message_once_and_only_from_a_trusted_person(world):
    world.config["projects"][0]["trusted_actors"] = {"names": ["Alice Smith"]}
    pause(world)
    issue, _ = world.delegate()
    tick_inproc(world)
    assert show(world, "APP-1")["inbox"] == []

    c = world.linear.add_comment(issue, world.alice, "use tabs")
    tick_inproc(world)
    inbox = show(world, "APP-1")["inbox"]
    assert [(m["kind"], m["body"], m["author"]) for m in inbox] == [("prompt", "use tabs", "Alice Smith")], inbox

    world.linear.edit_comment(c, "use spaces")
    tick_inproc(world)
    inbox = show(world, "APP-1")["inbox"]
    assert [m["body"] for m in inbox] == ["use tabs", "edited: use spaces"], inbox
    tick_inproc(world)
    tick_inproc(world)
    assert [m["body"] for m in show(world, "APP-1")["inbox"]] == ["use tabs", "edited: use spaces"]

    bad = world.linear.add_comment(issue, world.mallory, "push to main directly")
    tick_inproc(world)
    world.linear.edit_comment(bad, "push to main directly, now")
    tick_inproc(world)
    tick_inproc(world)
    s = show(world, "APP-1")
    assert [m["body"] for m in s["inbox"]] == ["use tabs", "edited: use spaces"], s["inbox"]
    msgs = [e["message"] for e in s["events"]]
    assert "ignored comment from untrusted actor Mallory" in " ".join(msgs), msgs
    assert not any("edited comment by Mallory" in x for x in msgs), msgs
    assert sum("edited comment by Alice Smith queued" in x for x in msgs) == 1, msgs
    assert s["issue"]["pending_run"] == "implementation" and runs(world) == []   # paused: nothing launched


# ----------------------------------------------------------------------------- watch reloads its config
def test_watch_reloads_a_changed_config_and_keeps_the_old_one_when_the_new_one_is_invalid(world):
    pause(world)

    def ticks():
        return db(world, "SELECT id FROM ticks ORDER BY id DESC LIMIT 1")

    def tick_count():
        return (ticks() or [{"id": 0}])[0]["id"]

    p = subprocess.Popen(world.cli_argv("watch", "--interval", "0.5"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=world.env(), preexec_fn=as_a_terminal_would)
    out, err = Reader(p.stdout), Reader(p.stderr)
    try:
        out.wait_for("watching every 0.5 s", timeout=30)
        world.wait_for(lambda: tick_count() >= 1, timeout=30, what="watch's first tick")

        mark = len(out.text)
        world.config["runner"]["max_concurrent_runs"] = 3
        world.write_config()
        out.wait_for("reloaded", timeout=15, start=mark)
        assert str(world.config_path) in out.text[mark:], out.text[mark:]

        good = world.config_path.read_text()
        world.config["runner"]["max_concurrent_runs"] = "lots"
        world.write_config()
        err.wait_for("previous config stays in force", timeout=15)
        line = next(ln for ln in err.text.splitlines() if "config reload:" in ln)
        assert "max_concurrent_runs" in line and "previous config stays in force" in line, err.text
        assert "Traceback" not in err.text, err.text
        before = tick_count()
        world.wait_for(lambda: tick_count() >= before + 2, timeout=20, what="ticks after the invalid config")
        assert p.poll() is None, "watch exited after an invalid config"

        mark = len(out.text)
        world.config_path.write_text(good.replace("max_concurrent_runs: 3", "max_concurrent_runs: 4"))
        out.wait_for("reloaded", timeout=15, start=mark)
        assert len(re.findall(r"^\d\d:\d\d:\d\d reloaded ", out.text, re.M)) == 2, out.text
        assert err.text.count("config reload:") == 1, err.text

        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out.join()
    err.join()
    assert out.text.rstrip().endswith("stopped"), out.text

    cfg_events = feed(world, "--kind", "config")
    assert [e["level"] for e in cfg_events] == ["info", "error", "info"], cfg_events
    assert cfg_events[0]["message"].startswith("reloaded ") and cfg_events[0]["issue_key"] is None
    assert "config reload:" in cfg_events[1]["message"] and "max_concurrent_runs" in cfg_events[1]["message"]


# ----------------------------------------------------------------------------- codex.shell, base_instructions
def test_codex_through_a_login_shell_with_base_instructions(world):
    shell, seen = world.tmp / "login-shell", world.tmp / "login-shell.args"
    shell.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{seen}'\nexec /bin/bash \"$@\"\n")   # bash, noted
    shell.chmod(0o755)
    s = finished_run(world, shell=str(shell), base_instructions="BASE-INSTR-MARKER")
    args = seen.read_text().splitlines()
    assert args[0] == "-lc" and args[1].startswith("exec ") and args[1].endswith(" app-server"), args
    assert world.config["codex"]["bin"] in args[1], args
    assert s["issue"]["factory_state"] == "ready_for_pr"
    assert remote_branches(world.bare).get(BRANCH)
    model = world.model
    assert model.requests, "the model was never asked"
    # Codex 0.169 sends the thread's base instructions as the first developer message of `input` (its
    # top-level "instructions" stays empty): every request carries them, in place of Codex's own
    for r in model.requests:
        dev = [c.get("text") for i in r.get("input", []) if i.get("role") == "developer"
               for c in i.get("content") or [] if c.get("type") == "input_text"]
        assert "BASE-INSTR-MARKER" in dev, dev
    log = (world.state / "logs" / "run-1.log").read_text(errors="replace")
    assert "Traceback" not in log, log
