"""One ordered simulcast layer type for the whole media path.

A stream's video layers are named by their source (SRT stream id ``cam1/high``,
WHIP ``rid``): ``high``, ``mid``, ``low`` or any other valid name. Everything
that ranks them — the fan-out's packetizers, a viewer's rewriter and
:class:`media.rtp.layers.LayerSelector` — uses a :class:`Layer`: its
``index`` counts in increasing bitrate (``0`` = lowest, the selector's
convention: it steps one index up or down), its ``name`` is the source's.

Names become layers at exactly one place, :func:`order_layers`. The standard
names rank ``low`` < ``mid`` < ``high``; any other name ranks with ``mid``
(a single custom layer is neither the cheapest nor the best), ties broken by
name so that the order does not depend on arrival.

A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["AUDIO", "Layer", "order_layers", "layer_named"]

#: The index of a stream's audio track where a layer index is expected (the
#: fan-out's sink calls, a rewriter's ``initial_layer``): never a video layer.
AUDIO = -1

_STANDARD_RANK = {"low": 0, "mid": 1, "high": 2}
_OTHER_RANK = 1


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
    ranked = sorted(set(names), key=lambda n: (_STANDARD_RANK.get(n, _OTHER_RANK), n))
    return tuple(Layer(i, name) for i, name in enumerate(ranked))


def layer_named(layers: tuple[Layer, ...], name: str | None) -> Layer | None:
    """The layer called ``name`` in ``layers``, or ``None``."""
    for layer in layers:
        if layer.name == name:
            return layer
    return None
