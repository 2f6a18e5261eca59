"""Linear app mode without a job of the operator's own: `patchrelay linear connect` stores the app's OAuth tokens,
encrypted, in the database, and every tick, worker and command refreshes them, one at a time, before they expire
or when Linear refuses them. The fake Linear serves /oauth/token as Linear does: tokens that expire after
seconds, refresh tokens that rotate and die at use, a reused one refused."""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest
import requests

import patchrelay as pr
from helpers import cli_inproc, db_dump, db_rows, say, tick_inproc, tool, wait_done

CLIENT_ID, CLIENT_SECRET = "patchrelay-client-1", "client-secret-s3cr3t-value"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_world(world):
    """The world in app mode with no LINEAR_API_KEY: the OAuth application, its client id and secret and the
    token key in the environment, nothing connected yet."""
    key = pr.new_token_key()
    world.redirect = f"http://127.0.0.1:{free_port()}/callback"
    world.linear.add_oauth_app(CLIENT_ID, CLIENT_SECRET, world.app, token_lifetime=3600,
                               redirect_uris=(world.redirect,))
    world.config["linear"]["oauth"] = {"redirect_uri": world.redirect}
    world.write_config()
    world.token_key = key
    base_env = world.env
    world.env = lambda **extra: base_env(**{"LINEAR_API_KEY": None, "PATCHRELAY_TOKEN_KEY": key,
                                            "LINEAR_CLIENT_ID": CLIENT_ID, "LINEAR_CLIENT_SECRET": CLIENT_SECRET,
                                            **extra})
    return world


def connect(world, lifetime=None):
    """`linear connect --code` with a code the admin's browser got."""
    if lifetime is not None:
        world.linear.oauth_lifetime(CLIENT_ID, lifetime)
    code = world.linear.authorize_code(CLIENT_ID, world.redirect)
    p = world.cli("linear", "connect", "--code", code, check=0)
    assert "Connected: Linear app user PatchRelay" in p.stdout, p.stdout
    return p


def oauth_row(world):
    rows = db_rows(world.state, "SELECT * FROM linear_oauth")
    return rows[0] if rows else None


def issued_tokens(world):
    """Every access and refresh token the fake Linear issued."""
    with world.linear.lock:
        return list(world.linear.oauth_access) + list(world.linear.oauth_refresh)


def no_secret_stored(world):
    """Neither token Linear issued, nor the client secret, nor the key, appears in any file under the state
    directory (database, WAL, logs), nor in the PostgreSQL database when the world runs on one."""
    secrets = issued_tokens(world) + [CLIENT_SECRET, world.token_key]
    assert len(secrets) >= 4
    if world.database_url:
        dump = db_dump(world.state)
        for s in secrets:
            assert s not in dump, f"{s[:12]}... found in the database"
    for p in world.state.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s[:12]}... found in {p}"


def test_connect_receives_the_redirect_and_ticks_use_the_stored_token(app_world):
    w = app_world
    p = subprocess.Popen(w.cli_argv("linear", "connect", "--timeout", "60"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=w.env())
    url = None
    for line in p.stdout:
        if "/oauth/authorize?" in line:
            url = line.strip()
        if line.startswith("Waiting for the redirect"):
            break
    assert url, "connect printed no authorize URL"
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert q["actor"] == ["app"] and q["client_id"] == [CLIENT_ID] and q["redirect_uri"] == [w.redirect]
    assert q["scope"] == ["read,write,app:assignable,app:mentionable"] and len(q["state"][0]) >= 16
    # the admin authorizes in the browser, which follows the redirect to the listener
    redirect = w.linear.authorize(CLIENT_ID, w.redirect, state=q["state"][0])
    page = requests.get(redirect, timeout=10)
    assert page.status_code == 200 and "close this tab" in page.text
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "Connected: Linear app user PatchRelay" in out and "refreshes itself" in out

    row = oauth_row(w)
    assert row["app_user"] == "PatchRelay" and row["refresh_token"] and row["expires_at"] > time.time() + 3000
    no_secret_stored(w)

    issue, session = w.delegate()
    t = tick_inproc(w)
    assert "APP-1" in t.stdout and "implementation queued" in t.stdout, t.stdout
    st = json.loads(cli_inproc(w, "status", "--json").stdout)["linear_token"]
    assert st["source"] == "connected" and st["app_user"] == "PatchRelay" and st["refresh_error"] is None
    assert "PASS [linear] connected app PatchRelay" in w.cli("doctor").stdout


def test_pasted_address_must_carry_this_connects_state(app_world):
    w = app_world
    redirect = w.linear.authorize(CLIENT_ID, w.redirect, state="someone-elses-state")
    p = subprocess.run(w.cli_argv("linear", "connect", "--paste"), input=redirect + "\n", capture_output=True,
                       text=True, env=w.env(), timeout=60)
    assert p.returncode == 2 and "`state` does not match" in p.stderr and "Traceback" not in p.stderr
    assert oauth_row(w) is None

    p = subprocess.Popen(w.cli_argv("linear", "connect", "--paste"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=w.env())
    url = None
    for line in p.stdout:
        if "/oauth/authorize?" in line:
            url = line.strip()
            break
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["state"][0]
    out, err = p.communicate(w.linear.authorize(CLIENT_ID, w.redirect, state=state) + "\n", timeout=30)
    assert p.returncode == 0 and "Connected" in out, err
    assert oauth_row(w)["app_user"] == "PatchRelay"


def test_connect_without_a_key_prints_one_and_stores_nothing(app_world):
    w = app_world
    p = w.cli("linear", "connect", "--code", "x", env={"PATCHRELAY_TOKEN_KEY": None}, check=2)
    assert "PATCHRELAY_TOKEN_KEY=" in p.stdout and p.stderr.count("\n") == 1, p.stderr
    key = p.stdout.split("PATCHRELAY_TOKEN_KEY=")[1].split()[0]
    assert len(key) == 44
    p = w.cli("tick", env={"PATCHRELAY_TOKEN_KEY": key}, check=2)     # a valid key, nothing connected
    assert "no Linear app is connected (`patchrelay linear connect`)" in p.stderr
    p = w.cli("linear", "connect", "--code", "x", env={"LINEAR_CLIENT_SECRET": None}, check=2)
    assert "linear.oauth.client_secret_env: LINEAR_CLIENT_SECRET is not set" in p.stderr
    assert oauth_row(w) is None
    # a code Linear refuses: one line naming the operation and host, exit 1
    p = w.cli("linear", "connect", "--code", "not-a-code", check=1)
    assert "Linear code exchange (127.0.0.1" in p.stderr and "invalid_grant" in p.stderr and "Traceback" not in p.stderr


def test_a_day_of_short_tokens_in_a_minute_refreshes_by_itself(app_world):
    """Tokens that live 3 s; ticks for 30 s, and a delegated issue implemented by a real worker (real Codex)
    in between: every tick works, tokens are refreshed before they expire by whichever process needs one, no
    grant is refused, and the run's Linear messages and its pull request arrive."""
    w = app_world
    w.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    connect(w, lifetime=3)
    issue, session = w.delegate()
    start, ticks = time.time(), 0
    while time.time() - start < 30:
        t = tick_inproc(w, check=None)
        assert t.returncode == 0, f"tick {ticks} exited {t.returncode}: {t.stdout}{t.stderr}"
        ticks += 1
        time.sleep(0.5)
    refreshes, refused = w.linear.refreshes(), w.linear.refused_grants()
    auth_refusals = [r for r in w.linear.requests if r["status"] == 400 and r["viewer"] is None
                     and not r["fault"]]
    print(f"{ticks} ticks over {time.time() - start:.0f} s with 3 s tokens: {refreshes} refreshes, "
          f"{len(refused)} refused grants, {len(auth_refusals)} requests refused for their token")
    assert refreshes >= 6 and not refused
    assert oauth_row(w)["refreshes"] == refreshes
    s = w.show("APP-1")
    assert s["pull_request"] is not None, s["issue"]
    assert "response" in w.activity_types(session)
    no_secret_stored(w)


def test_linear_refusing_a_token_refreshes_it_once_and_retries(app_world):
    w = app_world
    connect(w, lifetime=3600)
    before = w.linear.refreshes()
    # Linear stops accepting the access token long before its expiry
    with w.linear.lock:
        for t in w.linear.oauth_access.values():
            t["expires"] = 0
    w.delegate()
    t = tick_inproc(w)
    assert "implementation queued" in t.stdout
    assert w.linear.refreshes() == before + 1


def test_two_processes_needing_a_fresh_token_refresh_it_once(app_world):
    w = app_world
    connect(w, lifetime=3)
    time.sleep(3.2)                      # expired
    w.linear.oauth_delay = 1.0           # a slow token endpoint widens the race
    before = w.linear.refreshes()
    cfg = pr.load_config(str(w.config_path))
    got, errors = [], []

    def one():
        try:
            env = w.env()
            for k in ("PATCHRELAY_TOKEN_KEY", "LINEAR_CLIENT_ID", "LINEAR_CLIENT_SECRET"):
                os.environ[k] = env[k]
            store = pr.Store(cfg.database_path, url=cfg.database_url)
            got.append(pr.LinearTokens(cfg, store).current())
            store.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    os_env = dict(os.environ)
    try:
        os.environ.pop("LINEAR_API_KEY", None)
        threads = [threading.Thread(target=one) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
    finally:
        os.environ.clear()
        os.environ.update(os_env)
    assert not errors, errors
    assert len(got) == 4 and len(set(got)) == 1
    assert w.linear.refreshes() == before + 1 and not w.linear.refused_grants()


def test_a_lost_refresh_answer_loses_nothing_and_doctor_names_the_recovery(app_world):
    w = app_world
    w.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    connect(w, lifetime=4)
    issue, session = w.delegate()
    w.linear.oauth_drop_next_refresh()      # Linear rotates the pair, but its answer never arrives
    time.sleep(3.3)                          # within the refresh margin: the next tick refreshes
    p = w.cli("tick", check=None)
    assert "Traceback" not in p.stderr
    time.sleep(1.0)                          # the access token has expired; the refresh token died unseen
    p = w.cli("tick", check=1)
    assert "invalid_grant" in p.stderr and "patchrelay linear connect" in p.stderr and "Traceback" not in p.stderr
    st = w.status()
    assert st["linear_token"]["refresh_error"] and "invalid_grant" in st["linear_token"]["refresh_error"]
    d = w.cli("doctor", check=1)
    assert "FAIL [linear] Linear refused the token refresh" in d.stdout and "`patchrelay linear connect`" in d.stdout
    refused = len(w.linear.refused_grants())
    w.cli("tick", check=1)                  # no new grant is tried with a token known dead
    assert len(w.linear.refused_grants()) == refused

    connect(w, lifetime=3600)               # the recovery doctor names
    t = w.cli("tick", check=0)
    assert "APP-1" in t.stdout
    assert w.status()["linear_token"]["refresh_error"] is None
    s = wait_done(w)
    assert s["issue"]["factory_state"] not in ("failed", "escalated"), s["runs"]
    w.cli("tick", check=0)
    assert not [o for o in w.show("APP-1")["outbox"] if o["status"] != "sent"]     # every Linear write went
    bodies = [a["content"].get("body") for a in w.linear.activities(session)]
    assert len(bodies) == len(set(bodies))                                          # each once


def test_environment_token_wins_and_disconnect_revokes(app_world):
    w = app_world
    connect(w)
    st = json.loads(cli_inproc(w, "status", "--json", env={"LINEAR_API_KEY": "lin_oauth_apptoken123"}).stdout)
    assert st["linear_token"]["source"] == "environment"
    token_count = len(issued_tokens(w))
    assert token_count >= 1
    p = w.cli("linear", "disconnect", check=0)
    assert "revoked at Linear and removed from the database" in p.stdout
    assert oauth_row(w) is None
    assert w.linear.live_refresh_tokens(CLIENT_ID) == 0
    p = w.cli("tick", check=None)
    assert "no Linear app is connected" in p.stderr and "Traceback" not in p.stderr
    assert w.cli("linear", "disconnect", check=0).stdout.startswith("No Linear app is connected")


def test_codex_and_hooks_never_see_the_key_or_the_client_secret(app_world):
    cfg = pr.load_config(str(app_world.config_path))
    saved = dict(os.environ)
    try:
        os.environ.update({"PATCHRELAY_TOKEN_KEY": "k", "LINEAR_CLIENT_SECRET": "s", "LINEAR_CLIENT_ID": "id"})
        env = pr.stripped_child_env(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "PATCHRELAY_TOKEN_KEY" not in env and "LINEAR_CLIENT_SECRET" not in env
