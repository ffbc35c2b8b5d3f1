"""Training data: the procedural moving-shapes text-video world (numpy only)."""

from .shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    ShapesDataset,
    caption,
    parse_prompt,
    random_attributes,
    random_prompt,
    render,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "ShapesDataset",
    "caption",
    "parse_prompt",
    "random_attributes",
    "random_prompt",
    "render",
]
