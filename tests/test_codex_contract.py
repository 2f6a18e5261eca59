"""Codex drift is caught by a test that names the field: the pinned Codex describes its own app-server protocol
(`codex app-server generate-json-schema`), and every method PatchRelay sends and every field it reads must be
there, with the type PatchRelay expects."""
import copy
import functools

import pytest

import patchrelay
from fakes.world import codex_bin


@functools.lru_cache(maxsize=1)
def protocol():
    cfg = patchrelay.parse_config({"codex": {"bin": codex_bin()},
                                   "projects": [{"id": "app", "repo_path": "/nonexistent", "github_repo": "a/b"}]})
    return patchrelay.codex_protocol(cfg)


def test_the_pinned_codex_speaks_everything_patchrelay_uses():
    assert patchrelay.contract_problems(protocol()) == []


def test_every_request_and_notification_patchrelay_handles_is_in_the_contract():
    """The contract covers what the code sends: each method the worker requests or reads is listed."""
    source = open(patchrelay.__file__).read()
    for method in patchrelay.CODEX_CONTRACT["requests"]:
        assert f'"{method}"' in source
    for method in ("turn/completed", "item/completed", "thread/tokenUsage/updated"):
        assert method in patchrelay.CODEX_CONTRACT["notifications"]


def _v2(bundle, name):
    return bundle["definitions"]["v2"][name]


@pytest.mark.parametrize("drift, named", [
    (lambda b: _v2(b, "TurnCompletedNotification")["properties"].pop("turn"), "notification turn/completed: no field turn.id"),
    (lambda b: _v2(b, "TurnStartParams")["properties"].pop("input"), "request turn/start params: no field input"),
    (lambda b: _v2(b, "ThreadStartResponse")["properties"].pop("thread"), "request thread/start response: no field thread.id"),
    (lambda b: _v2(b, "ErrorNotification")["properties"].__setitem__("willRetry", {"type": "string"}),
     "notification error: willRetry is string, not boolean"),
    (lambda b: b["definitions"]["ClientRequest"]["oneOf"].__setitem__(
        slice(None), [o for o in b["definitions"]["ClientRequest"]["oneOf"]
                      if o["properties"]["method"]["enum"] != ["turn/steer"]]), "request turn/steer: not in the protocol"),
], ids=["renamed-notification-field", "renamed-param", "renamed-response-field", "retyped-field", "removed-method"])
def test_a_drifted_protocol_is_reported_by_name(drift, named):
    bundle = copy.deepcopy(protocol())
    drift(bundle)
    assert named in patchrelay.contract_problems(bundle)
