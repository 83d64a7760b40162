"""Typed configs: defaults, YAML, key=value overrides, and one-line errors that name key and source."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from medvlp.config import load_config, peek, save_config
from medvlp.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4
    layers: int = 2
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    paths: list[str] = field(default_factory=list)


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  layers: 4\nflag: true\n")
    config = load_config(Outer, path, ["inner.lr=5e-4", "paths=[a, b]", "inner.name=x"])
    assert config == Outer(Inner(lr=5e-4, layers=4, name="x"), flag=True, paths=["a", "b"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(Outer, tmp_path / "saved.yaml") == config
    assert peek(path, ["flag=false"], "flag", None) is False


@pytest.mark.parametrize("override, message", [
    ("inner.lyers=3", "override 'inner.lyers=3': inner: unknown config key 'lyers'; did you mean 'layers'?"),
    ("inner.layers=2.5", "override 'inner.layers=2.5': inner.layers: expected a whole number, got 2.5"),
    ("flag=maybe", "flag: expected true or false, got 'maybe'"),
    ("inner.lr=fast", "inner.lr: expected a number, got 'fast'"),
    ("paths=a", "paths: expected a list, got 'a'"),
    ("noequals", "is not of the form key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(Outer, None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("inner:\n  layers: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")


def test_save_config_is_atomic(tmp_path, monkeypatch):
    """A write that dies before its final rename leaves the previous config.yaml as it was, and no stray file."""
    from medvlp import config as module

    @dataclass
    class Small:
        name: str = "first"

    path = tmp_path / "config.yaml"
    save_config(Small(), path)
    before = path.read_text()

    def killed(source, target):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_config(Small(name="second"), path)
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    save_config(Small(name="second"), path)
    assert load_config(Small, path).name == "second"
