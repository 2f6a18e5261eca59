"""Token spend caps (codex.max_tokens_per_run / _per_issue / _per_day), with the real Codex CLI and the fake
model, whose responses report the tokens a script step says (`"tokens"`; 15 otherwise).

A run that crosses a cap is interrupted and ends awaiting input, with a Linear elicitation saying what was
spent; the issue and daily caps hold new runs (`why` names the gate, `status` shows the spend).
"""
import json

import pytest

from helpers import acts, bodies, db, say, tool, wait_done


def spend(tokens, cmd="echo step >> steps.txt"):
    return {**tool(cmd), "tokens": tokens}


def test_a_run_over_its_token_cap_stops_and_asks_in_linear(world):
    model = world.use_codex([spend(80), spend(80), spend(80), say("all done")], max_tokens_per_run=100)
    _, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    run = s["runs"][0]
    assert s["issue"]["factory_state"] == "awaiting_input", (s["issue"]["factory_state"], run)
    spent = db(world, "SELECT tokens_spent FROM runs")[0]["tokens_spent"]
    assert spent == 160, spent                              # interrupted after the second response
    assert len(model.requests) == 2, len(model.requests)
    asks = bodies(world, session, "elicitation")
    assert len(asks) == 1 and "this run spent 160 tokens, over codex.max_tokens_per_run (100)" in asks[0], \
        acts(world, session)
    assert "Reply here to continue" in asks[0]
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["tokens"]["today"] == 160 and st["tokens"]["run_cap"] == 100


@pytest.mark.parametrize("cap", ["max_tokens_per_day", "max_tokens_per_issue"])
def test_the_daily_and_issue_caps_hold_new_runs_until_raised(world, cap):
    world.use_codex([spend(80), spend(80), say("never reached"), say("Continued.")], **{cap: 100})
    issue, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert s["issue"]["factory_state"] == "awaiting_input"
    ask = bodies(world, session, "elicitation")[0]
    what = "today's runs" if cap == "max_tokens_per_day" else "this issue"
    assert f"{what} spent 160 tokens, over codex.{cap} (100)" in ask, ask
    # the person answers: a run is queued, but the cap holds it
    world.linear.add_prompt(session, world.alice, "please go on")
    p = world.tick_subprocess()
    assert "launched run" not in p.stdout, p.stdout
    row = db(world, "SELECT pending_run_type FROM issues")[0]
    assert row["pending_run_type"] == "implementation"
    why = json.loads(world.cli("why", "APP-1", "--json", check=0).stdout)
    gate = next(g for g in why["gates"] if g["gate"] == "token caps")
    assert gate["ok"] is False and ("daily token cap" if cap == "max_tokens_per_day" else "issue token cap") \
        in gate["value"], gate
    assert why["next"].startswith("wait: ") and "token cap" in why["next"], why["next"]
    # the operator raises the cap: the run starts
    world.config["codex"][cap] = 10_000
    world.write_config()
    p = world.tick_subprocess()
    assert "launched run" in p.stdout, p.stdout
    wait_done(world)
    assert len(db(world, "SELECT id FROM runs")) == 2


def test_a_cap_that_is_not_a_whole_positive_number_is_a_config_error(world):
    world.use_codex([], max_tokens_per_run=0)
    p = world.cli("tick")
    assert p.returncode == 2 and "codex.max_tokens_per_run: must be at least 1" in p.stderr, p.stderr
