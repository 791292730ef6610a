"""One ordered simulcast layer type for the whole media path.

A stream's video layers are named by their source (SRT stream id ``cam1/high``,
WHIP ``rid``): ``high``, ``mid``, ``low`` or any other valid name. Everything
that ranks them — the fan-out's packetizers, a viewer's rewriter and
:class:`media.rtp.layers.LayerSelector` — uses a :class:`Layer`: its
``index`` counts in increasing bitrate (``0`` = lowest, the selector's
convention: it steps one index up or down), its ``name`` is the source's.

Names become layers at exactly one place, :func:`order_layers`, by the
stream's rule (``media.stream.layer_names``: an SRT source's video PIDs,
largest first, are ``high``, ``mid``, ``low``, then ``low2``, ``low3`` …):
``high`` > ``mid`` > ``low`` > any other name, the others in reverse name
order (``low`` > ``low2`` > ``low3``), so that the order never depends on
arrival. (The fan-out used to rank other names with ``mid``, which put
``low2`` above ``low``.)

A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["AUDIO", "Layer", "order_layers", "layer_named", "layer_names", "rank_high_first"]

#: The index of a stream's audio track where a layer index is expected (the
#: fan-out's sink calls, a rewriter's ``initial_layer``): never a video layer.
AUDIO = -1

#: Largest first, as the stream lists its layers.
_STANDARD_HIGH_FIRST = ("high", "mid", "low")


@dataclass(frozen=True, slots=True, order=True)
class Layer:
    """A video layer: ``index`` in increasing bitrate, ``name`` as the
    source called it. Orders by index."""

    index: int
    name: str

    def __str__(self) -> str:
        return self.name


def order_layers(names: Iterable[str]) -> tuple[Layer, ...]:
    """The boundary from a stream's layer names (any order, as
    ``Stream.layers`` or a WHIP offer's rids give them) to :class:`Layer` values
    in increasing bitrate."""
    high_first = sorted(set(names), key=rank_high_first)
    return tuple(Layer(i, name) for i, name in enumerate(reversed(high_first)))


def rank_high_first(name: str) -> tuple[int, str]:
    """Sort key, largest first: ``high``, ``mid``, ``low``, then any other
    name (``low2`` before ``low3``)."""
    try:
        return (_STANDARD_HIGH_FIRST.index(name), name)
    except ValueError:
        return (len(_STANDARD_HIGH_FIRST), name)


def layer_names(count: int) -> list[str]:
    """The names an SRT source's ``count`` video layers get, largest first."""
    if count <= 3:
        return {1: ["high"], 2: ["high", "low"], 3: ["high", "mid", "low"]}.get(count, [])
    return ["high", "mid", "low"] + [f"low{i}" for i in range(2, count - 1)]


def layer_named(layers: tuple[Layer, ...], name: str | None) -> Layer | None:
    """The layer called ``name`` in ``layers``, or ``None``."""
    for layer in layers:
        if layer.name == name:
            return layer
    return None
