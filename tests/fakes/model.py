"""A scripted fake of the OpenAI *Responses API*, for driving the real Codex CLI offline.

Codex only speaks ``wire_api = "responses"``: every model call is ``POST {base_url}/responses``
answered with a Server-Sent-Events stream. Each POST consumes the next *step* of the script:

  {"kind": "tool_call", "cmd": "echo hi > f.txt"}   function call to Codex's ``exec_command`` tool;
        optional "workdir", "yield_time_ms", "call_id", "tool" (default exec_command),
        "extra_args" (merged into the call's arguments)
  {"kind": "message", "text": "All done."}          final assistant message (ends the turn)
  {"kind": "http_error", "status": 500}              plain HTTP error, no stream ("message" optional; or a
                                                     whole JSON "body" and extra "headers", as providers send:
                                                     usage_limit_reached, rate_limit_exceeded, context_length_exceeded)
  {"kind": "drop"}                                   send response.created, then close the socket
  {"kind": "hang", "seconds": 30}                    send response.created, then stall until the
                                                     time is up, ``release()`` or ``stop()``
  {"kind": "wait", "event": E, "then": STEP}         hold the request (nothing sent yet) until E is set;
                                                     E is a threading.Event or a gate name (see ``gate``).
                                                     Without "then", the next script step is taken when
                                                     the gate opens, so a test may ``push`` it meanwhile.

When the script is empty the reply is the message "(script exhausted)".

A ``responder`` (constructor keyword or attribute) replaces the script: a function of the request's parsed
JSON body returning the step to serve, so concurrent conversations each get their own answer (e.g. a tool
call when the request's ``input`` holds no ``function_call_output`` yet, else a message). Its step may be
any kind above; a "wait" step without "then" takes the responder's answer for the same request when the gate
opens. ``responder_for_issue_files`` builds one that writes a file named after the issue key in the prompt.

    model = FakeModel([...]).start()
    ... model.base_url ...          # "http://127.0.0.1:PORT/v1"
    model.push({"kind": "message", "text": "more"})
    model.wait_held("g"); ...; model.open("g")
    model.stop()

Binds to 127.0.0.1 only. Thread-safe.
"""
import hashlib
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXHAUSTED = {"kind": "message", "text": "(script exhausted)"}
_ids = itertools.count(1)


def _sse(event_type, **fields):
    fields["type"] = event_type
    return f"event: {event_type}\ndata: {json.dumps(fields)}\n\n".encode()


def _usage(total=15):
    """The usage a response reports: 15 tokens, or a step's "tokens" (for spend caps)."""
    return {"input_tokens": total - 5, "input_tokens_details": None, "output_tokens": 5,
            "output_tokens_details": None, "total_tokens": total}


def sse_events(step):
    """The SSE chunks that answer a "tool_call" or "message" step."""
    n = next(_ids)
    resp_id = f"resp_{n}"
    out = [_sse("response.created", response={"id": resp_id})]
    kind = step["kind"]
    if kind == "tool_call":
        args = {"cmd": step["cmd"]}
        for key in ("workdir", "yield_time_ms"):
            if key in step:
                args[key] = step[key]
        args.update(step.get("extra_args", {}))
        item = {"type": "function_call", "id": f"fc_{n}", "call_id": step.get("call_id", f"call_{n}"),
                "name": step.get("tool", "exec_command"), "arguments": json.dumps(args)}
        out.append(_sse("response.output_item.added", output_index=0, item=item))
        out.append(_sse("response.output_item.done", output_index=0, item=item))
    elif kind == "message":
        msg_id = f"msg_{n}"
        text = step["text"]
        out.append(_sse("response.output_item.added", output_index=0, item={
            "type": "message", "role": "assistant", "id": msg_id, "content": []}))
        for i in range(0, len(text), 16):
            out.append(_sse("response.output_text.delta", item_id=msg_id, output_index=0,
                            content_index=0, delta=text[i:i + 16]))
        out.append(_sse("response.output_item.done", output_index=0, item={
            "type": "message", "role": "assistant", "id": msg_id,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}))
    else:
        raise ValueError(f"not a streamed step: {step!r}")
    out.append(_sse("response.completed", response={"id": resp_id, "usage": _usage(step.get("tokens", 15))}))
    return out


class FakeModel:
    def __init__(self, script=None, host="127.0.0.1", port=0, responder=None):
        self._script = list(script or [])
        self.responder = responder  # function(request body) -> step, used instead of the script when set
        self.requests = []        # parsed JSON body of every POST .../responses, in arrival order
        self.headers = []         # request headers (dict) of the same POSTs
        self.served = []          # the step kind used for each of those POSTs
        self._cond = threading.Condition()
        self._gates = {}          # name -> threading.Event
        self._held = {}           # id(event) -> number of requests that reached that wait step
        self._release_gen = 0
        self._stopped = threading.Event()
        self._thread = None
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"

    # ---- lifecycle ----
    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="fake-model", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stopped.set()
        with self._cond:
            self._release_gen += 1
            self._cond.notify_all()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- script ----
    def push(self, *steps):
        """Append steps to the script (may be called while Codex is running)."""
        with self._cond:
            self._script.extend(steps)

    @property
    def remaining(self):
        with self._cond:
            return list(self._script)

    def _next_step(self):
        with self._cond:
            return self._script.pop(0) if self._script else dict(EXHAUSTED)

    def _step_for(self, body, after_wait=False):
        """The step that answers this request: the responder's when one is set, else the script's next."""
        responder = self.responder
        if responder is None:
            return self._next_step()
        step = responder(body)
        if after_wait and step.get("kind") == "wait":
            return dict(EXHAUSTED)      # a responder that keeps waiting after its gate opened: end the turn
        return dict(step)

    # ---- control of hangs and wait gates ----
    def release(self):
        """End every "hang" in progress now (later hangs are not affected)."""
        with self._cond:
            self._release_gen += 1
            self._cond.notify_all()

    def gate(self, name):
        """The threading.Event behind the gate called `name` (created on first use)."""
        with self._cond:
            return self._gates.setdefault(name, threading.Event())

    def open(self, name_or_event):
        """Let requests held at that wait gate go on."""
        self._event(name_or_event).set()

    def _event(self, name_or_event):
        return name_or_event if isinstance(name_or_event, threading.Event) else self.gate(name_or_event)

    def held(self, name_or_event):
        """How many requests have reached a wait step on this gate so far."""
        with self._cond:
            return self._held.get(id(self._event(name_or_event)), 0)

    def wait_held(self, name_or_event, count=1, timeout=10):
        """Block until `count` requests have reached a wait step on this gate (the turn is then in progress
        and the model call is pending). Raises TimeoutError."""
        key = id(self._event(name_or_event))
        with self._cond:
            if not self._cond.wait_for(lambda: self._held.get(key, 0) >= count, timeout):
                raise TimeoutError(f"no request held at gate {name_or_event!r} within {timeout}s "
                                   f"({len(self.requests)} requests so far)")

    def wait_requests(self, count, timeout=10):
        """Block until at least `count` POSTs to /responses have arrived. Raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} of {count} model requests within {timeout}s")

    # ---- inspection ----
    @staticmethod
    def user_texts(request, include_context=True):
        """Texts of the user messages in a request's `input`, in order. Codex also sends context as user
        messages (<environment_context>, AGENTS.md instructions ...); include_context=False drops texts that
        start with "<" or "# AGENTS.md"."""
        texts = []
        for item in request.get("input", []):
            if item.get("type", "message") != "message" or item.get("role") != "user":
                continue
            content = item.get("content")
            parts = [content] if isinstance(content, str) else [
                c.get("text", "") for c in content or [] if c.get("type") in ("input_text", "text")]
            for text in parts:
                if include_context or not (text.lstrip().startswith("<") or text.startswith("# AGENTS.md")):
                    texts.append(text)
        return texts

    @staticmethod
    def tool_outputs(request):
        """The `output` strings of the function_call_output items in a request's `input`."""
        return [i.get("output") for i in request.get("input", []) if i.get("type") == "function_call_output"]

    # ---- HTTP ----
    def _record(self, body, headers, step_kind):
        with self._cond:
            self.requests.append(body)
            self.headers.append(headers)
            self.served.append(step_kind)
            self._cond.notify_all()

    def _hold(self, event):
        key = id(event)
        with self._cond:
            self._held[key] = self._held.get(key, 0) + 1
            self._cond.notify_all()
        while not event.wait(0.05):
            if self._stopped.is_set():
                return False
        return not self._stopped.is_set()

    def _hang(self, seconds):
        deadline = time.monotonic() + seconds
        with self._cond:
            gen = self._release_gen
            self._cond.wait_for(lambda: self._release_gen != gen or time.monotonic() >= deadline,
                                max(0.0, seconds))

    def _handler_class(model):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._plain(404, b"{}")

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if not self.path.rstrip("/").endswith("/responses"):
                    return self._plain(404, b"{}")
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("latin1")}
                step = model._step_for(body)
                model._record(body, dict(self.headers), step["kind"])
                while step["kind"] == "wait":
                    if not model._hold(model._event(step["event"])):
                        self.close_connection = True
                        return
                    step = step.get("then") or model._step_for(body, after_wait=True)
                self._serve(step)

            def _serve(self, step):
                kind = step["kind"]
                if kind == "http_error":
                    body = step.get("body") or {"error": {"message": step.get("message", "fake failure")}}
                    return self._plain(step.get("status", 500), json.dumps(body).encode(), step.get("headers"))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")   # the body ends when the socket closes
                self.end_headers()
                self.close_connection = True
                try:
                    if kind in ("drop", "hang"):
                        self.wfile.write(_sse("response.created", response={"id": f"resp_{next(_ids)}"}))
                        self.wfile.flush()
                        if kind == "hang":
                            model._hang(step.get("seconds", 30))
                        return
                    for chunk in sse_events(step):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _plain(self, status, data, headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


ISSUE_KEY_IN_PROMPT = re.compile(r"Linear issue ([A-Za-z][A-Za-z0-9]*-\d+)")


def has_tool_output(request):
    """Whether the request's `input` holds a function_call_output (the turn already ran a command)."""
    return any(i.get("type") == "function_call_output" for i in request.get("input", []) or [])


def conversation_name(request):
    """A name for the conversation a request belongs to: the issue key of PatchRelay's prompt ("Linear issue
    APP-3: ..."), else a short hash of the first user text."""
    texts = FakeModel.user_texts(request)
    for text in texts:
        m = ISSUE_KEY_IN_PROMPT.search(text)
        if m:
            return m.group(1)
    return "conv-" + hashlib.sha256((texts[0] if texts else "").encode()).hexdigest()[:10]


def responder_for_issue_files(sleep=0.0, text="Done."):
    """A responder for concurrent runs: a request whose input holds no function_call_output yet (a thread's
    first call) gets a tool call that sleeps `sleep` seconds, then writes `fleet-<KEY>.txt` holding the key (the
    same content on every attempt, in any thread); every other request gets the message `text`."""
    def respond(request):
        if has_tool_output(request):
            return {"kind": "message", "text": text}
        name = conversation_name(request)
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        pause = f"sleep {sleep:g} && " if sleep else ""
        return {"kind": "tool_call", "cmd": f"{pause}echo {slug} > fleet-{slug}.txt",
                "yield_time_ms": int(max(10.0, sleep + 10.0) * 1000)}
    return respond
