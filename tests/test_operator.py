"""Operator commands: pause / resume (global and per issue), release, and `why`."""
import json

from helpers import cli_inproc, db_exec, finished_issue, pause as pause_runner, show, status, tick_inproc


def why(world, key):
    r = cli_inproc(world, "why", key, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_pause_and_resume_globally_and_per_issue_hold_launches_and_say_who_and_why(world):
    world.delegate()
    world.delegate(title="Second thing")
    r = cli_inproc(world, "pause", "--reason", "deploy freeze")
    assert r.exit_code == 0, r.output
    out = tick_inproc(world).stdout
    assert "launched" not in out
    st = status(world)
    assert st["paused"]["reason"] == "deploy freeze" and st["paused"]["by"]
    assert all(i["active_run"] is None for i in st["issues"])
    w = why(world, "APP-1")
    assert w["next"].startswith("a person: `patchrelay resume`")
    assert {g["gate"]: g["ok"] for g in w["gates"]}["runner not paused"] is False
    assert "PAUSED by" in cli_inproc(world, "status").stdout

    # resume globally, but keep APP-2 paused: only APP-1 may launch (the runner config stays paused here)
    assert cli_inproc(world, "pause", "APP-2", "--reason", "waiting for design").exit_code == 0
    assert cli_inproc(world, "resume").exit_code == 0
    w2 = why(world, "APP-2")
    assert {g["gate"]: g["value"] for g in w2["gates"]}["issue not paused"]["reason"] == "waiting for design"
    table = cli_inproc(world, "status").stdout                 # piped: tab-separated, the pause in the state
    row = next(ln.split("\t") for ln in table.splitlines() if ln.startswith("APP-2\t"))
    assert row[3] == "delegated (paused)", row
    assert "paused: by " in cli_inproc(world, "show", "APP-2").stdout and "waiting for design" in \
        cli_inproc(world, "show", "APP-2").stdout
    assert why(world, "APP-1")["next"] == "launch the implementation run at the next tick"
    assert cli_inproc(world, "resume", "APP-2").exit_code == 0
    assert why(world, "APP-2")["next"] == "launch the implementation run at the next tick"


def test_config_pause_is_the_boot_default_and_resume_overrides_it(world):
    pause_runner(world)                    # runner.paused: true in the config
    world.delegate()
    tick_inproc(world)
    assert status(world)["paused"]["by"] == "config"
    assert cli_inproc(world, "resume").exit_code == 0
    assert status(world)["paused"] is None


def test_release_stops_tracking_and_tells_the_session_why(world):
    pause_runner(world)
    _, session = world.delegate()
    tick_inproc(world)
    r = cli_inproc(world, "release", "APP-1", "--reason", "we will do this by hand")
    assert r.exit_code == 0, r.output
    tick_inproc(world)
    s = show(world, "APP-1")
    assert s["issue"]["factory_state"] == "canceled" and s["issue"]["pending_run"] is None
    bodies = [a["content"]["body"] for a in world.linear.activities(session) if a["content"]["type"] == "response"]
    assert bodies == ["An operator released APP-1 from PatchRelay: we will do this by hand. I will not work on it "
                      "unless it is delegated to me again."]
    assert why(world, "APP-1")["next"].startswith("nothing: the issue is canceled")


def test_why_explains_an_untracked_issue_and_every_gate_of_a_tracked_one(world):
    w = why(world, "APP-9")
    assert w["tracked"] is False and "delegate it to PatchRelay" in w["next"]
    pause_runner(world)
    world.delegate()
    tick_inproc(world)
    w = why(world, "APP-1")
    names = [g["gate"] for g in w["gates"]]
    assert names == ["routed", "delegated", "trusted", "runner not paused", "issue not paused", "active run",
                     "pending run", "concurrency", "repair budgets", "token caps", "rate limits", "Codex capacity",
                     "Linear outbox"]
    text = cli_inproc(world, "why", "APP-1").stdout
    assert text.startswith("APP-1  delegated") and "next: " in text


def test_status_shows_what_needs_attention_and_list_reaches_the_rest(world):
    """At thousands of issues `status` stays short: open issues and those changed in the last day, with a count
    of the rest; `status --all` and `list [--state] [--project] [--limit]` reach every issue."""
    pause_runner(world)
    for title in ("One", "Two", "Three"):
        world.delegate(title=title)
    tick_inproc(world)
    db_exec(world.state, "UPDATE issues SET factory_state = 'done', pending_run_type = NULL, "
                         "updated_at = '2020-01-01T00:00:00.000Z' WHERE key = 'APP-1'")
    db_exec(world.state, "UPDATE issues SET factory_state = 'done', pending_run_type = NULL WHERE key = 'APP-2'")
    st = status(world)
    assert sorted(i["key"] for i in st["issues"]) == ["APP-2", "APP-3"] and st["others"] == 1, st
    text = cli_inproc(world, "status").output
    assert "APP-1" not in text and "... and 1 closed issue(s) unchanged for a day" in text, text
    everything = json.loads(cli_inproc(world, "status", "--all", "--json").output)
    assert sorted(i["key"] for i in everything["issues"]) == ["APP-1", "APP-2", "APP-3"] and everything["others"] == 0
    done = json.loads(cli_inproc(world, "list", "--state", "done", "--json").output)["issues"]
    assert [i["key"] for i in done] == ["APP-2", "APP-1"]             # most recently changed first
    assert [i["key"] for i in json.loads(cli_inproc(world, "list", "--limit", "1", "--json").output)["issues"]] \
        == ["APP-3"]
    assert json.loads(cli_inproc(world, "list", "--project", "nope", "--json").output) == {"issues": []}
    assert "APP-1" in cli_inproc(world, "list").output


def test_run_of_a_finished_issue_asks_for_force(world):
    finished_issue(world)
    r = cli_inproc(world, "run", "APP-1")
    assert r.exit_code == 2 and "is done; add --force" in r.stderr, r.stderr


def test_ctrl_c_ends_events_follow_quietly_with_exit_0(world):
    import signal
    import subprocess
    import time
    pause_runner(world)
    world.delegate()
    tick_inproc(world)
    def as_a_terminal_would():
        # Ctrl-C reaches a command started from a shell: SIGINT at its default and not blocked, whatever the
        # test runner's own process does with it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    p = subprocess.Popen(world.cli_argv("events", "APP-1", "--follow"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=world.env(), preexec_fn=as_a_terminal_would)
    deadline = time.time() + 30
    first = p.stdout.readline()                     # the log so far is printed before following
    assert first.strip(), "events --follow printed nothing"
    while time.time() < deadline and p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            continue
    if p.poll() is None:                            # say what the process was doing, for whoever reads this
        status = open(f"/proc/{p.pid}/status").read()
        p.kill()
        raise AssertionError("events --follow outlived 15 SIGINTs: " + " ".join(
            line for line in status.splitlines() if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt"))))
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0 and err == "", (p.returncode, err)
