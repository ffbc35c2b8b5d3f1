"""The procedural moving-shapes world (training clips and captions) and its pixel evaluator.

numpy only. `shapes` renders the world; `evaluate` reads a video's pixels back and says which
colour, shape, motion and background it shows, and how coherent a long stream stays.
"""

from .evaluate import coherence, evaluate, summarise
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
    "coherence",
    "evaluate",
    "parse_prompt",
    "random_attributes",
    "random_prompt",
    "render",
    "summarise",
]
