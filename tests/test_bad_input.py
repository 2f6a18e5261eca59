"""Hostile and mistaken issue references on the command line: one escaped line, exit 2, nothing sent to
Linear; Linear issue URLs work wherever a key does."""
import pytest

from test_intake import cli_inproc, pause, tick


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
    tick(world)
    url = "https://linear.app/acme/issue/app-1/add-a-greeting"
    r = cli_inproc(world, "show", url)
    assert r.exit_code == 0 and r.stdout.startswith("APP-1  Add a greeting"), r.output
    r = cli_inproc(world, "stop", url)
    assert r.exit_code == 0 and "APP-1: stop requested" in r.stdout, r.output


def test_run_of_an_issue_linear_does_not_know_names_the_key(world):
    r = cli_inproc(world, "run", "NOPE-1")
    assert r.exit_code == 2 and r.stderr.strip() == "patchrelay: issue NOPE-1: not found in Linear", r.stderr
