"""The one way configs are read from and written to JSON.

Every config (the DiT's ModelArgs, the VAE and text-encoder configs, the training configs) is a
dataclass deriving from `ConfigBase`: `from_dict` ignores keys the class does not know (as
mlx-lm does, so a newer folder still loads), checks every field against its annotation (one
error naming the field) and turns JSON lists into the tuples the annotations ask for;
`to_dict` gives the JSON-ready dict (tuples back to lists).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from .validate import check_field_types


class ConfigBase:
    """Mixin for dataclass configs (see the module docstring)."""

    config_name: ClassVar[str] = "config"  # how messages name it: "dit config: dim must be ..."

    @classmethod
    def adapt(cls, d: dict) -> dict:
        """Hook: rename or fill keys of a foreign config.json before the fields are read."""
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        """Build from a dict, ignoring unknown keys; S2DiTError naming a badly typed field."""
        d = cls.adapt(d)
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        check_field_types(config, cls.config_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(config, f.name)
            if typing.get_origin(hints.get(f.name)) is tuple and isinstance(value, list):
                setattr(config, f.name, tuple(value))
            elif typing.get_origin(hints.get(f.name)) is list and isinstance(value, tuple):
                setattr(config, f.name, list(value))
        return config

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
