"""The two layouts of the transformer's layer params, and conversion between them.

  unrolled (scan_layers=False)  {"layer_0": {...}, ..., "layer_{n-1}": {...}, "embed": ...}
  scanned  (scan_layers=True)   {"layers": {... each leaf with a leading n_layers axis}, ...}

`stack_layers` / `unstack_layers` convert any pytree that holds such dicts at any depth:
params, {"params": params} variables, optimiser states whose moments mirror the params.
Leaves are numpy or jax arrays (unboxed). A jax result is computed where its inputs live;
device_put it onto the target model's shardings (state.abstract_params) when that matters.
Checkpoints and Hugging Face files keep whichever layout they were written in; convert at
the boundary (model/hf.py does for Hugging Face).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYER_PREFIX = "layer_"
STACKED = "layers"


def layer_index(key: Any) -> int | None:
    """i for "layer_i", None for any other key."""
    if isinstance(key, str) and key.startswith(LAYER_PREFIX) and key[len(LAYER_PREFIX):].isdigit():
        return int(key[len(LAYER_PREFIX):])
    return None


def per_layer_paths(path: tuple, n_layers: int) -> list[tuple] | None:
    """A flattened scanned param path ("layers", *rest) -> its unrolled paths
    [("layer_0", *rest), ...]; None for a path outside the layers (embeddings, head)."""
    if not path or path[0] != STACKED:
        return None
    return [(f"{LAYER_PREFIX}{i}", *path[1:]) for i in range(n_layers)]


def _is_unrolled(x) -> bool:
    return isinstance(x, Mapping) and any(layer_index(k) is not None for k in x)


def _is_scanned(x) -> bool:
    return isinstance(x, Mapping) and isinstance(x.get(STACKED), Mapping)


def _stack(*xs):
    if all(isinstance(x, (np.ndarray, np.generic)) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _stack_dict(d):
    if not _is_unrolled(d):
        return d
    found = sorted(i for i in map(layer_index, d) if i is not None)
    if found != list(range(len(found))):
        raise ValueError(f"stack_layers: layers {found} are not layer_0 ... layer_{{n-1}}")
    if STACKED in d:
        raise ValueError(f"stack_layers: both {STACKED!r} and layer_i entries in one dict")
    layers = [d[f"{LAYER_PREFIX}{i}"] for i in found]
    shapes = [jax.tree.map(np.shape, layer) for layer in layers]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(f"stack_layers: {LAYER_PREFIX}{i} holds other parameters (or "
                             f"shapes) than {LAYER_PREFIX}0")
    out = {k: v for k, v in d.items() if layer_index(k) is None}
    out[STACKED] = jax.tree.map(_stack, *layers)
    return out


def _unstack_dict(d):
    if not _is_scanned(d):
        return d
    lengths = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(d[STACKED])}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"unstack_layers: the leaves under {STACKED!r} do not share one leading "
                         f"layer axis (leading sizes {sorted(map(str, lengths))})")
    if any(layer_index(k) is not None for k in d):
        raise ValueError(f"unstack_layers: both {STACKED!r} and layer_i entries in one dict")
    (n,) = lengths
    out = {k: v for k, v in d.items() if k != STACKED}
    for i in range(n):
        out[f"{LAYER_PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], d[STACKED])
    return out


def stack_layers(tree):
    """Unrolled layout -> scanned layout (params of a scan_layers=True model)."""
    return jax.tree.map(_stack_dict, tree, is_leaf=_is_unrolled)


def unstack_layers(tree):
    """Scanned layout -> unrolled layout (params of a scan_layers=False model)."""
    return jax.tree.map(_unstack_dict, tree, is_leaf=_is_scanned)
