import json
def test_smoke(world):
    world.use_codex([{"kind": "tool_call", "cmd": "echo hello > hello.txt"},
                     {"kind": "message", "text": "Added hello.txt."}])
    issue, session = world.delegate()
    p = world.tick()
    print(p.stdout, p.stderr)
    s = world.wait_run_done("APP-1")
    print(json.dumps(s, indent=1)[:6000])
    print(world.activity_types(session))
    print(world.cli("report", "APP-1").stdout)
    import subprocess
    print(open(world.state / "logs" / "run-1.log").read()[-3000:])
