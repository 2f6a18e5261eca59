"""A failing GitHub Actions job is rerun (github.rerun_failed_checks times, default 1) on the same head before a
repair run starts: a rerun that passes is a flaky check, said once in Linear and counted in `status`; one that
fails again gets its repair run with the newest log. Through the CLI with the real Codex CLI and the fake GitHub."""
import json

from helpers import bodies, drive, say, tool

REPO = "acme/app"


def policy(rerun):
    """`test` fails on the branch (it has hello.txt); its rerun does what `rerun` says."""
    def checks(sha, fake):
        if fake.file_at(REPO, sha, "hello.txt") is None:
            return [{"name": "test", "conclusion": "SUCCESS"}]
        return [{"name": "test", "conclusion": "FAILURE", "log": "first attempt: connection reset\n",
                 "rerun_result": rerun}]
    return checks


def test_a_job_that_passes_when_rerun_is_flaky_and_needs_no_repair(world):
    world.github.set_check_policy(REPO, policy({"conclusion": "SUCCESS", "log": "all passed\n"}))
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    _, session = world.delegate()
    s = drive(world, lambda s: s["pull_request"] is not None and s["pull_request"]["ci"] == "success", "green CI")
    assert [r["run_type"] for r in s["runs"]] == ["implementation"]                     # no repair run
    assert [r["name"] for r in world.github.reruns] == ["test"]                          # rerun once
    world.tick_subprocess()
    head = s["pull_request"]["head_sha"]
    said = [b for b in bodies(world, session, "response") if "flaky" in b]
    assert said == [f"CI check `test` failed on {head[:8]} and passed when rerun: a flaky check, no repair needed."]
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["flaky_checks"] == {"test": 1}
    assert "flaky checks (passed when rerun): test 1" in world.cli("status", check=0).stdout


def test_a_job_that_fails_again_gets_its_repair_with_the_newest_log(world):
    world.github.set_check_policy(REPO, policy({"conclusion": "FAILURE", "log": "second attempt: AssertionError\n"}))
    model = world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."),
                             tool("rm hello.txt"), say("Removed hello.txt.")])
    world.delegate()
    s = drive(world, lambda s: any(r["run_type"] == "ci_repair" for r in s["runs"]), "the repair run")
    assert [r["name"] for r in world.github.reruns] == ["test"]
    prompts = [t for req in model.requests for t in model.user_texts(req, include_context=False)
               if "## Failing checks" in t]
    assert prompts and "second attempt: AssertionError" in prompts[0] and "first attempt" not in prompts[0]
    assert json.loads(world.cli("status", "--json", check=0).stdout)["flaky_checks"] == {}
    assert s["pull_request"]["budgets_used"] == {"ci:test": 1}


def test_no_rerun_when_turned_off(world):
    world.config["github"].update(rerun_failed_checks=0)
    world.write_config()
    world.github.set_check_policy(REPO, policy({"conclusion": "SUCCESS"}))
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."), tool("rm hello.txt"), say("Fixed.")])
    world.delegate()
    drive(world, lambda s: any(r["run_type"] == "ci_repair" for r in s["runs"]), "the repair run")
    assert world.github.reruns == []


def test_a_rerun_github_refuses_goes_straight_to_repair(world):
    world.github.set_check_policy(REPO, policy({"conclusion": "SUCCESS"}))
    world.github.fail_next(1, 403, match="/rerun", body={"message": "Resource not accessible by integration"})
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."), tool("rm hello.txt"), say("Fixed.")])
    world.delegate()
    s = drive(world, lambda s: any(r["run_type"] == "ci_repair" for r in s["runs"]), "the repair run")
    assert world.github.reruns == []
    assert any("could not rerun a failed job" in e["message"] for e in s["events"])
