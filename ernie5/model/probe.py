"""Probe hooks of the model: the steps a measuring tool wants to see run through a probe object.

Layers that call such a step have a `probe` attribute (the class default `NO_PROBE`, which just calls the
function), and the call goes through `self.probe.run(phase, key, fn, *args, **kwargs)`. A tool (`ernie5 bench`)
puts its own object with the same `run` method on the model (`attach`) to time, profile or capture those steps,
and takes it off again; no name of the model code is replaced.

What a call passes:
- `phase`: what kind of work it is (`attention`, `norms_rope`, `head_loss`);
- `key`: the step's name; when `fn` is a bound method of a layer (`attn.qkv`), the step is that layer's own
  method `key`, otherwise `fn` is a plain function the caller runs (`apply_rope`, `group_mask`, ...);
- `fn(*args, **kwargs)`: the work itself, whose result `run` returns unchanged.

Layer forwards need no call here: Paddle's forward pre / post hooks already reach every layer's forward.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import paddle.nn as nn


class Probe(Protocol):
    def run(self, phase: str, key: str, fn: Callable, *args, **kwargs) -> Any:
        """Call `fn(*args, **kwargs)` as step `key` of kind `phase` and return its result."""


class NoProbe:
    """Runs every step as is."""

    def run(self, phase: str, key: str, fn: Callable, *args, **kwargs) -> Any:
        return fn(*args, **kwargs)


NO_PROBE = NoProbe()


def attach(root: nn.Layer, probe: Probe) -> None:
    """Set `probe` on `root` and on every sublayer whose class has a `probe` attribute; `NO_PROBE` detaches
    (the instance attribute is dropped, so the class default applies again and the instance is as before)."""
    for layer in root.sublayers(include_self=True):
        if not hasattr(type(layer), "probe"):
            continue
        if probe is NO_PROBE:
            vars(layer).pop("probe", None)
        else:
            layer.probe = probe
