"""In-process fakes of the external services PatchRelay talks to (import the submodules directly,
e.g. ``from fakes.linear import FakeLinear``)."""
