def test_smoke(world):
    issue, session = world.delegate()
    p = world.tick()
    print(p.stdout, p.stderr)
    st = world.status()
    print(st)
    print(world.activity_types(session), world.linear.plans_for(session))
    assert st["issues"][0]["factory_state"] == "delegated"
    p = world.tick()
    print(p.stdout, p.stderr)
    print(world.show(issue["identifier"]))
