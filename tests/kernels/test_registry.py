"""The one entry-point registry (``kernels/registry.py``) behind the selector and policy registries."""

from types import SimpleNamespace

import pytest

from vllm_sparse.kernels import registry as reg


class Base:
    name = ""


class Alpha(Base):
    name = "alpha"


class Beta(Base):
    name = "beta"


def fake_entry_points(*eps):
    return lambda group: [ep for ep in eps if ep.group == group]


def ep(name, cls, group="test.group"):
    return SimpleNamespace(name=name, value=f"pkg:{cls.__name__}", group=group, load=lambda: cls)


def test_builtins_and_entry_points_by_name(monkeypatch):
    r = reg.Registry("test.group", Base, "thing", "thing_setting", make=lambda cls: cls())
    r.register(Alpha)
    monkeypatch.setattr(reg, "entry_points", fake_entry_points(ep("beta", Beta), ep("other", Alpha, "x.group")))
    assert isinstance(r.get("alpha"), Alpha) and "beta" not in r  # entry points read on a miss, not before
    assert isinstance(r.get("beta"), Beta) and r.names() == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"vllm_sparse thing_setting='gamma'; allowed: \['alpha', 'beta'\]"):
        r.get("gamma")
    r.unregister("beta")
    r.unregister("never_there")
    assert "beta" not in r
    r.load_entry_points(reload=True)  # a package installed into a running process
    assert "beta" in r


def test_bad_classes_and_misnamed_entry_points_are_refused(monkeypatch):
    def no_b(cls):
        if cls.name.startswith("b"):
            raise TypeError("no b")

    r = reg.Registry("test.group", Base, "thing", "thing_setting", check=no_b)
    with pytest.raises(TypeError, match="Base subclass with a non-empty `name`"):
        r.register(int)
    with pytest.raises(TypeError, match="Base subclass with a non-empty `name`"):
        r.register(Base)
    with pytest.raises(TypeError, match="no b"):
        r.register(Beta)
    monkeypatch.setattr(reg, "entry_points", fake_entry_points(ep("gamma", Alpha)))
    with pytest.raises(ValueError, match="entry point 'gamma' .* loads a thing named 'alpha'; the names must match"):
        r.names()
