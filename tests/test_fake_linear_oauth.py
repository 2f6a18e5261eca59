"""Tests of FakeLinear's OAuth 2.0 endpoints (/oauth/token, /oauth/revoke) themselves, with plain requests."""
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fakes.linear import FakeLinear

CID, SECRET, REDIRECT = "client-1", "s3cret", "http://localhost:8765/callback"
VIEWER = "query { viewer { id } }"


@pytest.fixture
def fake():
    f = FakeLinear()
    f.app = f.add_user("PatchRelay", app=True)
    f.add_oauth_app(CID, SECRET, f.app)
    with f:
        yield f


def base(fake):
    return fake.url.rsplit("/graphql", 1)[0]


def token(fake, auth=None, **form):
    if auth is None:
        form = {"client_id": CID, "client_secret": SECRET, **form}
    return requests.post(base(fake) + "/oauth/token", data=form, auth=auth, timeout=5)


def exchange(fake, code, redirect_uri=REDIRECT, **kw):
    return token(fake, grant_type="authorization_code", code=code, redirect_uri=redirect_uri, **kw)


def refresh(fake, refresh_token, **kw):
    return token(fake, grant_type="refresh_token", refresh_token=refresh_token, **kw)


def viewer(fake, access_token):
    r = requests.post(fake.url, json={"query": VIEWER}, headers={"Authorization": f"Bearer {access_token}"},
                      timeout=5)
    return r.status_code, r.json()


def authenticated_as(fake, access_token):
    status, body = viewer(fake, access_token)
    if status == 400 and body["errors"][0]["extensions"]["code"] == "AUTHENTICATION_ERROR":
        return None
    assert status == 200, body
    return body["data"]["viewer"]["id"]


def grant(fake, **kw):
    r = exchange(fake, fake.authorize_code(CID, REDIRECT, **kw))
    assert r.status_code == 200, r.text
    return r.json()


def test_code_exchange_once(fake):
    url = fake.authorize(CID, REDIRECT, state="xyz")
    q = parse_qs(urlsplit(url).query)
    assert url.startswith(REDIRECT + "?") and q["state"] == ["xyz"]
    assert "state" not in fake.authorize(CID, REDIRECT)
    r = exchange(fake, q["code"][0])
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["access_token"].startswith("lin_oauth_") and body["refresh_token"].startswith("lin_refresh_")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 86400
    assert body["scope"] == "read write app:assignable app:mentionable"
    assert authenticated_as(fake, body["access_token"]) == fake.app["id"]

    again = exchange(fake, q["code"][0])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert exchange(fake, "nope").json()["error"] == "invalid_grant"
    assert [r["result"] for r in fake.oauth_log] == ["issued", "invalid_grant", "invalid_grant"]
    assert fake.requests and all(r["operation"] == "viewer" for r in fake.requests)   # /oauth/* not in there


def test_authorize_validates_client_and_redirect(fake):
    with pytest.raises(ValueError):
        fake.authorize("nobody", REDIRECT)
    with pytest.raises(ValueError):
        fake.authorize(CID, "http://evil.test/cb")


def test_wrong_redirect_uri_refused(fake):
    code = fake.authorize_code(CID, REDIRECT)
    r = exchange(fake, code, redirect_uri="http://localhost:9999/other")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant" and r.json()["error_description"]


def test_client_authentication(fake):
    code = fake.authorize_code(CID, REDIRECT)
    r = exchange(fake, code, client_secret="wrong")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = exchange(fake, code, client_id="nobody")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # HTTP Basic works too, and the code was not used up by the refused attempts
    r = exchange(fake, code, auth=(CID, SECRET))
    assert r.status_code == 200, r.text


def test_json_body_and_unknown_grant_type_refused(fake):
    code = fake.authorize_code(CID, REDIRECT)
    r = requests.post(base(fake) + "/oauth/token", timeout=5, json={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
        "client_id": CID, "client_secret": SECRET})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = token(fake, grant_type="client_credentials")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    assert exchange(fake, code).status_code == 200


def test_refresh_rotates(fake):
    first = grant(fake)
    assert fake.live_refresh_tokens() == 1
    r = refresh(fake, first["refresh_token"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    assert fake.refreshes() == 1 and fake.live_refresh_tokens(CID) == 1
    # the previous access token lives until its own expiry
    assert authenticated_as(fake, first["access_token"]) == fake.app["id"]
    assert authenticated_as(fake, second["access_token"]) == fake.app["id"]

    reuse = refresh(fake, first["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json() == {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
    assert refresh(fake, "lin_refresh_unknown").json()["error"] == "invalid_grant"
    assert len(fake.refused_grants()) == 2 and fake.refreshes() == 1
    assert refresh(fake, second["refresh_token"]).status_code == 200


def test_access_token_expires(fake):
    fake.oauth_lifetime(CID, 1)
    body = grant(fake)
    assert body["expires_in"] == 1
    assert authenticated_as(fake, body["access_token"]) == fake.app["id"]
    fake.advance(3600)   # the fake's own clock does not age tokens
    assert authenticated_as(fake, body["access_token"]) == fake.app["id"]
    time.sleep(1.2)
    status, answer = viewer(fake, body["access_token"])
    assert status == 400 and answer["errors"][0]["extensions"]["code"] == "AUTHENTICATION_ERROR"
    # the refresh token still works and gives a fresh access token
    r = refresh(fake, body["refresh_token"])
    assert r.status_code == 200 and authenticated_as(fake, r.json()["access_token"]) == fake.app["id"]


def test_revoke_kills_the_grant(fake):
    first = grant(fake)
    second = refresh(fake, first["refresh_token"]).json()
    other = grant(fake)   # a second authorization of the same app: its own grant
    revoke = base(fake) + "/oauth/revoke"

    r = requests.post(revoke, data={"token": second["refresh_token"]}, timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"

    r = requests.post(revoke, data={"token": second["refresh_token"], "token_type_hint": "refresh_token"},
                      headers={"Authorization": f"Bearer {first['access_token']}"}, timeout=5)
    assert r.status_code == 200 and r.json() == {}
    for access in (first["access_token"], second["access_token"]):
        assert authenticated_as(fake, access) is None
    assert refresh(fake, second["refresh_token"]).json()["error"] == "invalid_grant"
    assert authenticated_as(fake, other["access_token"]) == fake.app["id"]
    assert fake.live_refresh_tokens() == 1

    # unknown tokens: 200 (RFC 7009); client credentials as authentication
    r = requests.post(revoke, data={"token": "lin_oauth_unknown", "client_id": CID, "client_secret": SECRET},
                      timeout=5)
    assert r.status_code == 200
    r = requests.post(revoke, data={"token": other["access_token"]}, auth=(CID, SECRET), timeout=5)
    assert r.status_code == 200 and authenticated_as(fake, other["access_token"]) is None
    assert fake.live_refresh_tokens() == 0
    assert [r["result"] for r in fake.oauth_log if r["path"] == "/oauth/revoke"] == \
        ["invalid_client", "revoked", "revoked", "revoked"]


def test_drop_next_refresh(fake):
    first = grant(fake)
    fake.oauth_drop_next_refresh()
    with pytest.raises(requests.ConnectionError):
        refresh(fake, first["refresh_token"])
    assert fake.oauth_log[-1]["result"] == "issued-dropped"
    assert fake.refreshes() == 1 and fake.refreshes(include_dropped=False) == 0
    r = refresh(fake, first["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert fake.live_refresh_tokens() == 1   # the pair issued into the void
    # the old access token is still good until it expires
    assert authenticated_as(fake, first["access_token"]) == fake.app["id"]


def test_delay_widens_the_race(fake):
    first = grant(fake)
    fake.oauth_delay = 0.3
    results = []
    threads = [threading.Thread(target=lambda: results.append(refresh(fake, first["refresh_token"]).status_code))
               for _ in range(2)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 400]
    assert time.time() - t0 < 0.9   # the lock is not held while sleeping
    assert fake.refreshes() == 1 and len(fake.refused_grants()) == 1
