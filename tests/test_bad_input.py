"""Hostile and mistaken issue references on the command line: one escaped line, exit 2, nothing sent to
Linear; Linear issue URLs work wherever a key does."""
import pytest

from helpers import cli_inproc, db_dump, db_exec, pause, tick_inproc


@pytest.mark.parametrize("ref, shown", [
    ("APP-1\n", "APP-1\\n"),
    ("APP-\u0661", "APP-\u0661"),                       # an Arabic-Indic digit is not a digit of a key
    ("APP-1\u202egnp.exe", "APP-1\\u202egnp.exe"),      # right-to-left override
    ("A" * 5000 + "-1", None),
    ("../APP-1", "../APP-1"),
    ("", ""),
])
@pytest.mark.parametrize("command", ["show", "run", "stop", "retry", "report", "events", "worktree"])
def test_a_bad_issue_reference_is_one_escaped_line_and_exit_2(world, command, ref, shown):
    n = len(world.linear.requests)
    r = cli_inproc(world, command, ref)
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "not an issue key like APP-123 or a Linear issue URL" in lines[0], r.stderr
    assert "\u202e" not in r.stderr and len(lines[0]) < 200
    if shown is not None:
        assert shown in lines[0]
    assert len(world.linear.requests) == n            # nothing reached Linear


def test_a_linear_issue_url_works_where_a_key_does(world):
    pause(world)
    world.delegate()
    tick_inproc(world)
    url = "https://linear.app/acme/issue/app-1/add-a-greeting"
    r = cli_inproc(world, "show", url)
    assert r.exit_code == 0 and r.stdout.startswith("APP-1  Add a greeting"), r.output
    r = cli_inproc(world, "stop", url)
    assert r.exit_code == 0 and "APP-1: stop requested" in r.stdout, r.output


def test_run_of_an_issue_linear_does_not_know_names_the_key(world):
    r = cli_inproc(world, "run", "NOPE-1")
    assert r.exit_code == 2 and r.stderr.strip() == "patchrelay: issue NOPE-1: not found in Linear", r.stderr


@pytest.mark.parametrize("body", [{"data": {}}, {"data": None}, "boom", {"errors": "boom"}])
def test_run_when_linear_answers_the_issue_lookup_with_an_odd_shape_is_an_error_not_not_found(world, body):
    world.linear.reply_next(body, 9, operation="PatchRelayIssue")
    r = cli_inproc(world, "run", "NOPE-1")
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "PatchRelayIssue" in lines[0] and "not found" not in lines[0], r.stderr


def test_tick_without_the_linear_token_is_a_config_error_exit_2(world):
    p = world.cli("tick", env={"LINEAR_API_KEY": None})
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "LINEAR_API_KEY" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_a_tick_whose_process_is_gone_shows_as_interrupted(world):
    import json
    import subprocess
    pause(world)
    tick_inproc(world)
    dead = subprocess.Popen(["true"])
    dead.wait()
    db_exec(world.state, "UPDATE ticks SET result = NULL, ended_at = NULL, pid = ?, pid_started = 'x' "
                         "WHERE id = (SELECT MAX(id) FROM ticks)", (dead.pid,))
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["last_tick"]["result"] == "interrupted", st["last_tick"]


def test_a_token_of_any_shape_is_redacted_where_linear_echoes_it(world):
    """The configured token itself, not only token-shaped strings, never reaches stderr or the database."""
    plain = "plainsecret42xyz"
    world.linear.add_token(plain, world.app)
    world.linear.reply_next({"errors": [{"message": f"bad header Authorization={plain} rejected"}]}, 9,
                            operation="PatchRelayPoll")
    p = world.cli("tick", env={"LINEAR_API_KEY": plain})
    assert "PatchRelayPoll" in p.stderr and plain not in p.stdout + p.stderr, p.stderr
    world.linear.reply_next({"errors": [{"message": f"token {plain[::-1][::-1]} is odd"}]}, 9,
                            operation="PatchRelayPoll")
    p = world.cli("tick", env={"LINEAR_API_KEY": plain})
    assert plain not in p.stdout + p.stderr, p.stderr
    raw = b"".join(f.read_bytes() for f in world.state.rglob("*") if f.is_file())
    raw += db_dump(world.state).encode() if world.database_url else b""        # PostgreSQL: its rows
    assert plain.encode() not in raw
