"""The fake model and the real Codex CLI (`codex app-server`) work together, offline.

These tests talk to codex directly over stdio JSON-RPC (a small client below), not through PatchRelay,
so a failure here points at the test environment rather than at PatchRelay.
"""
import http.client
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from fakes import world
from fakes.model import FakeModel


class AppServer:
    """Minimal blocking client for `codex app-server` (one JSON object per line, no "jsonrpc" field)."""

    def __init__(self, codex, env, stderr_path):
        self._stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen([codex, "app-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env={**os.environ, **env}, text=True, bufsize=1)
        self.inbox = queue.Queue()
        self.seen = []
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.inbox.put(json.loads(line))
        self.inbox.put(None)

    def send(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def request(self, method, params, timeout=20):
        self._next_id += 1
        rid = self._next_id
        self.send({"id": rid, "method": method, "params": params})
        reply = self.wait_for(lambda m: m.get("id") == rid and "method" not in m, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, predicate, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no matching message from codex within {timeout}s") from None
            if msg is None:
                raise EOFError("codex app-server closed stdout")
            self.seen.append(msg)
            if "id" in msg and "method" in msg:   # server -> client request; approvals are off, so refuse
                self.send({"id": msg["id"], "error": {"code": -32601, "message": "unsupported in test"}})
                continue
            if predicate(msg):
                return msg

    def start_thread(self, cwd, sandbox):
        self.request("initialize", {"clientInfo": {"name": "patchrelay-tests", "title": None, "version": "0"},
                                    "capabilities": None})
        self.send({"method": "initialized"})
        return self.request("thread/start", {"cwd": str(cwd), "approvalPolicy": "never",
                                             "sandbox": sandbox})["thread"]["id"]

    def start_turn(self, thread_id, text):
        return self.request("turn/start", {"threadId": thread_id, "input": [
            {"type": "text", "text": text, "text_elements": []}]})["turn"]["id"]

    def wait_turn(self, turn_id, timeout=20):
        done = self.wait_for(lambda m: m.get("method") == "turn/completed"
                             and m["params"]["turn"]["id"] == turn_id, timeout)
        return done["params"]["turn"]

    def commands(self):
        """Completed commandExecution items, in order."""
        return [m["params"]["item"] for m in self.seen if m.get("method") == "item/completed"
                and m["params"]["item"]["type"] == "commandExecution"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()          # app-server exits when stdin closes
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def env(tmp_path):
    """(model, start_codex, repo): a FakeModel, a factory for an app-server pointed at it, and a git clone."""
    model = FakeModel().start()
    _bare, repo = world.make_origin(tmp_path)
    codex_env = world.write_codex_home(tmp_path / "codex-home", model.base_url)
    servers = []

    def start_codex():
        srv = AppServer(world.codex_bin(), codex_env, tmp_path / f"codex-{len(servers)}.stderr")
        servers.append(srv)
        return srv

    yield model, start_codex, repo
    for srv in servers:
        srv.close()
    model.stop()


def test_workspace_write_edits_files_but_git_is_read_only(env, tmp_path):
    model, start_codex, repo = env
    model.push({"kind": "tool_call", "cmd": "echo hello > hello.txt"},
               {"kind": "tool_call", "cmd": "git add hello.txt && git commit -q -m 'add hello'"},
               {"kind": "message", "text": "Wrote hello.txt."})
    srv = start_codex()
    thread_id = srv.start_thread(repo, "workspace-write")
    turn = srv.wait_turn(srv.start_turn(thread_id, "Create hello.txt"))

    assert turn["status"] == "completed", turn
    assert turn["items"][-1]["text"] == "Wrote hello.txt."
    assert (repo / "hello.txt").read_text() == "hello\n"
    # The sandbox mounts .git read-only: the agent cannot commit, which is why PatchRelay commits itself.
    assert world.git(repo, "log", "--format=%s").splitlines() == ["Initial commit"]
    assert world.git(repo, "status", "--porcelain") == "?? hello.txt"
    # The model got the prompt as a user message and each command's output.
    assert len(model.requests) == 3
    assert FakeModel.user_texts(model.requests[0], include_context=False) == ["Create hello.txt"]
    write_out, commit_out = FakeModel.tool_outputs(model.requests[2])
    assert "exited with code 0" in write_out
    assert "exited with code 128" in commit_out and "Read-only file system" in commit_out, commit_out
    # Codex 0.169.0 sometimes sends no item/* notifications for a command the sandbox denied (here the
    # commit): only the model is sure to see it. So check items only for the first command.
    assert srv.commands()[0]["command"] == "/bin/bash -lc 'echo hello > hello.txt'"
    assert srv.commands()[0]["exitCode"] == 0

    # Same in a linked worktree: its gitdir (<repo>/.git/worktrees/NAME) is read-only too,
    # even though it lies outside the thread's cwd.
    worktree = tmp_path / "worktrees" / "APP-1"
    world.git(repo, "worktree", "add", "-q", "-b", "app/APP-1", worktree)
    model.push({"kind": "tool_call", "cmd": "echo hi > f.txt && git add f.txt && git commit -q -m f"},
               {"kind": "message", "text": "Tried."})
    wt_thread = srv.request("thread/start", {"cwd": str(worktree), "approvalPolicy": "never",
                                             "sandbox": "workspace-write"})["thread"]["id"]
    turn = srv.wait_turn(srv.start_turn(wt_thread, "Commit f.txt"))
    assert turn["status"] == "completed", turn
    assert (worktree / "f.txt").exists()
    assert "Read-only file system" in FakeModel.tool_outputs(model.requests[-1])[0]
    assert world.git(worktree, "log", "--format=%s").splitlines() == ["Initial commit"]


def test_danger_full_access_can_commit(env):
    model, start_codex, repo = env
    model.push({"kind": "tool_call", "cmd": "echo hello > hello.txt && git add hello.txt && git commit -q -m 'add hello'"},
               {"kind": "message", "text": "Committed."})
    srv = start_codex()
    thread_id = srv.start_thread(repo, "danger-full-access")
    turn = srv.wait_turn(srv.start_turn(thread_id, "Create and commit hello.txt"))

    assert turn["status"] == "completed", turn
    assert (repo / "hello.txt").read_text() == "hello\n"
    assert world.git(repo, "log", "--format=%s").splitlines() == ["add hello", "Initial commit"]
    assert srv.commands()[0]["exitCode"] == 0


def test_http_500_fails_the_turn(env):
    model, start_codex, repo = env
    model.push({"kind": "http_error", "status": 500})
    srv = start_codex()
    thread_id = srv.start_thread(repo, "workspace-write")
    turn = srv.wait_turn(srv.start_turn(thread_id, "Do something"))

    assert turn["status"] == "failed", turn
    assert turn["error"]["message"]
    assert len(model.requests) == 1                     # request_max_retries = 0: no retry
    # The thread stays usable: the next turn gets the next step.
    model.push({"kind": "message", "text": "Recovered."})
    turn = srv.wait_turn(srv.start_turn(thread_id, "Again"))
    assert turn["status"] == "completed" and turn["items"][-1]["text"] == "Recovered."


def test_steer_reaches_the_model_while_a_request_is_held(env):
    model, start_codex, repo = env
    model.push({"kind": "tool_call", "cmd": "echo one > one.txt"},
               {"kind": "wait", "event": "gate", "then": {"kind": "message", "text": "discarded by codex"}},
               {"kind": "message", "text": "Saw the steer."})
    srv = start_codex()
    thread_id = srv.start_thread(repo, "workspace-write")
    turn_id = srv.start_turn(thread_id, "First task")
    model.wait_held("gate")                             # the turn is in progress, its model call pending
    srv.request("turn/steer", {"threadId": thread_id, "expectedTurnId": turn_id, "input": [
        {"type": "text", "text": "Also mind the steer", "text_elements": []}]})
    model.open("gate")
    turn = srv.wait_turn(turn_id)

    assert turn["status"] == "completed", turn
    # Codex drops the answer to the request that was in flight when the steer arrived and asks again,
    # with the steered text as the last user message.
    assert turn["items"][-1]["text"] == "Saw the steer."
    assert len(model.requests) == 3
    assert "Also mind the steer" not in FakeModel.user_texts(model.requests[1])
    assert FakeModel.user_texts(model.requests[2], include_context=False) == ["First task", "Also mind the steer"]
    assert (repo / "one.txt").exists()


def _post(url, timeout=5):
    req = urllib.request.Request(url + "/responses", data=b'{"input": []}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def test_fake_model_steps_over_plain_http():
    with FakeModel([{"kind": "http_error", "status": 503}, {"kind": "drop"},
                    {"kind": "hang", "seconds": 30}]) as model:
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(model.base_url)
        assert err.value.code == 503
        body = _post(model.base_url)
        assert "response.created" in body and "response.completed" not in body
        t0 = time.monotonic()
        threading.Timer(0.2, model.release).start()
        body = _post(model.base_url)                    # the hang ends on release(), not after 30 s
        assert time.monotonic() - t0 < 5 and "response.completed" not in body
        assert "(script exhausted)" in _post(model.base_url)
        assert model.served == ["http_error", "drop", "hang", "message"]
        assert len(model.requests) == 4 and model.requests[0] == {"input": []}


def test_fake_model_wait_gates_over_plain_http():
    gate = threading.Event()
    model = FakeModel([{"kind": "wait", "event": gate}]).start()
    try:
        replies = []
        first = threading.Thread(target=lambda: replies.append(_post(model.base_url)))
        first.start()
        model.wait_held(gate)
        model.push({"kind": "message", "text": "pushed while held"})   # taken when the gate opens
        assert model.held(gate) == 1 and not replies
        model.open(gate)
        first.join(5)
        assert "pushed while held" in replies[0]
        model.push({"kind": "wait", "event": "never", "then": {"kind": "message", "text": "unreachable"}})
        def post_expecting_disconnect():
            try:
                replies.append(_post(model.base_url))
            except (OSError, http.client.HTTPException) as exc:   # the server went away
                replies.append(exc)

        second = threading.Thread(target=post_expecting_disconnect, daemon=True)
        second.start()
        model.wait_held("never")
    finally:
        model.stop()                                    # also lets go of requests still held
    second.join(5)
    assert not second.is_alive() and isinstance(replies[1], Exception)
    assert model.served == ["wait", "wait"]
