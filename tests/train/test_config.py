"""Layered config: YAML then --set overrides, strict keys and types, nested sections, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from snce.config import Config, ConfigError, load_config


@dataclass
class Optim(Config):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    schedule: Literal["cosine", "constant"] = "cosine"
    clip: float | None = 1.0


@dataclass
class Data(Config):
    name: str = "digits"
    path: str | None = None

    def check(self) -> None:
        if self.name == "folder" and self.path is None:
            raise ConfigError("path", "is required when name is 'folder'")


@dataclass
class Top(Config):
    steps: int = 10
    amp: bool = True
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    quantizer: dict = field(default_factory=lambda: {"name": "vq", "codebook_size": 16})
    mults: tuple[int, ...] = (1, 2)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\noptim:\n  lr: 1e-4\n  betas: [0.5, 0.9]\nmults: [1, 2, 4]\n")
    cfg = load_config(
        Top,
        f,
        ["optim.lr=3e-4", "data.name=shapes", "quantizer.codebook_size=4096", "optim.clip=null"],
    )
    assert cfg.steps == 5 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.5, 0.9)
    assert cfg.mults == (1, 2, 4) and cfg.data.name == "shapes" and cfg.optim.clip is None
    assert cfg.quantizer == {"name": "vq", "codebook_size": 4096}
    # YAML 1.1 reads "1e-4" as a string; float fields still take it.
    assert isinstance(load_config(Top, f).optim.lr, float)
    assert Top.from_dict(cfg.to_dict()) == cfg


def test_str_field_keeps_raw_override():
    assert load_config(Top, None, ["data.name=123"]).data.name == "123"


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lrr=1", "optim.lrr", "unknown key; expected one of: betas, clip, lr, schedule"),
        ("stepz=3", "stepz", "unknown key"),
        ("steps=ten", "steps", "expected int"),
        ("steps=1.5", "steps", "expected int"),
        ("amp=3", "amp", "expected bool"),
        ("optim.schedule=linear", "optim.schedule", "one of 'cosine', 'constant'"),
        ("optim.betas=[1]", "optim.betas", "a list of 2"),
        ("steps.x=1", "steps.x", "not a section"),
        ("data.name=folder", "data.path", "is required when name is 'folder'"),
    ],
)
def test_errors_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Top, None, [override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and expected in str(info.value)


def test_yaml_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="'optim.lr': expected float"):
        load_config(Top, f)
    f.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="'optim': expected a mapping"):
        load_config(Top, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Top, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Top, None, ["novalue"])


def test_json_round_trip(tmp_path):
    cfg = load_config(Top, None, ["optim.betas=[0.1, 0.2]"])
    cfg.save_json(tmp_path / "c.json")
    assert Top.load_json(tmp_path / "c.json") == cfg
