"""LoRA for the Stable Cascade networks, as the official ``modules/lora.py`` defines it, in NNX.

The official rules, reproduced here:

* every module whose official name contains one of the ``filters`` (substring match; None = every
  module) and owns a ``weight`` parameter, or else an ``in_proj_weight``, gets a LoRA: the weight
  becomes W + lora_up @ lora_down · alpha / rank (the product broadcast over conv kernel taps);
  alpha is 1; ``lora_down`` starts at zeros and ``lora_up`` at N(0, 1);
* the adapted weights are visited in ``generator.modules()`` order (the order of the factors in an
  official file: ``weights/lora_files.py``). A torch parametrization is registered as the *last child*
  of its module, so a module's LoRA comes after the LoRAs of its children: in an attention block,
  ``out_proj`` before the packed ``in_proj``. Models declare their children's official order.

How it is done here: the adapted attribute (``Linear.weight``, ``MultiheadAttention.in_proj_weight``,
``Embedding.weight``) is replaced by an :class:`AdaptedWeight`. Layers read it as before (``w[...]``)
and get the base weight plus every enabled adapter's delta times its strength; the base
``nnx.Param`` object stays untouched inside (``.original``), so removing or unmerging a LoRA gives
the base back bit for bit, never by subtraction. Factors and token-row deltas are
:class:`LoRAParam` variables, so ``nnx.state(model, LoRAParam)`` is exactly what a LoRA trainer
updates. Strengths are :class:`LoRAStrength` scalars: traced, so changing one does not recompile.
Several LoRAs live side by side under their names; each can be switched off (``set_enabled``).
A LoRA as a file holds it (``LoRAWeights``), checked against a model and attached to it, is
``weights/lora_weights.py``; reading and writing the files, ``weights/lora_files.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_FILTERS = (".attn",)  # the official configs' ``module_filters``
# A strength (a LoRA's, a ControlNet's) scales weight deltas or residuals: far past this only overflows into
# NaN images (1e30 did, after a whole sampling run), so it is refused before any work.
MAX_STRENGTH = 100.0
WEIGHT_ATTRIBUTES = ("weight", "in_proj_weight")  # checked in this order, as the official apply_lora does


def check_strength(what: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``what`` (e.g. "LoRA style.safetensors strength"): a
    strength is a finite number within +-``MAX_STRENGTH``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, (bool, np.bool_)) or number is None or not np.isfinite(number) \
            or abs(number) > MAX_STRENGTH:
        raise ValueError(f"{what} must be a finite number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
                         f"(1 is full strength), got {value!r}")
    return number


class LoRAParam(nnx.Param):
    """A LoRA factor or token-row delta: the only parameters a LoRA trainer updates."""


class LoRAStrength(nnx.Variable):
    """A LoRA's multiplier at run time (a scalar; not trained)."""


class MergedWeight(nnx.Variable):
    """The effective weight cached by :func:`merge` (not trained, not saved)."""


# ------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class LayerFactors:
    """One weight's LoRA in PyTorch layout, as the files hold it: down (rank, in), up (out, rank)."""

    down: np.ndarray
    up: np.ndarray
    alpha: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass
class TokenDeltas:
    """Rows added to the text encoder's token table: ``table[indices[i]] += rows[i]``."""

    indices: np.ndarray  # (N,) int64 token ids
    rows: np.ndarray  # (N, D)
    tokens: list  # the token string of each row, None where unknown (official files do not store them)


# ------------------------------------------------------------------------------- adapters
def _torch_dims(shape: tuple, layout: str) -> tuple[int, int]:
    """(dim 0, dim 1) of the PyTorch tensor of a weight of our ``shape`` and layout: what the factors span."""
    if len(shape) < 2:
        raise ValueError(f"a LoRA needs a weight with at least 2 dimensions, got shape {tuple(shape)}")
    if layout in ("linear", "conv"):  # ours (..., in, out), PyTorch (out, in, ...)
        return shape[-1], shape[-2]
    if layout == "conv_transpose":  # ours (kh, kw, in, out), PyTorch (in, out, kh, kw)
        return shape[-2], shape[-1]
    if layout == "same":
        return shape[0], shape[1]
    raise ValueError(f"unknown torch_layout {layout!r}")


def _delta_in_our_layout(delta, shape: tuple, layout: str):
    """A PyTorch-layout (dim0, dim1) delta in our layout, broadcast over conv taps as the official
    ``view(out, in, 1, 1)`` does (every tap gets the same value, so a flipped kernel is unchanged)."""
    if layout == "same":
        return jnp.broadcast_to(delta.reshape(delta.shape + (1,) * (len(shape) - 2)), shape)
    # linear / conv: PyTorch (out, in) -> ours (..., in, out); conv_transpose: PyTorch (in, out) is ours already.
    ours = delta if layout == "conv_transpose" else delta.T
    return jnp.broadcast_to(ours, shape)


class LoRAFactors(nnx.Module):
    """One LoRA on one weight: W + strength · (lora_up @ lora_down) · alpha / rank."""

    def __init__(self, down, up, alpha: float = 1.0, strength: float = 1.0, axes=(None, None)):
        self.lora_down = LoRAParam(jnp.asarray(down), torch_layout="same", axes=(None, axes[1]))
        self.lora_up = LoRAParam(jnp.asarray(up), torch_layout="same", axes=(axes[0], None))
        self.alpha = float(alpha)
        self.strength = LoRAStrength(jnp.asarray(strength, jnp.float32), torch_layout="same", axes=())
        self.enabled = True

    def add_to(self, weight, layout: str):
        up, down = self.lora_up[...].astype(jnp.float32), self.lora_down[...].astype(jnp.float32)
        # The official order: (up @ down) * alpha / rank, then the strength (1 for the official code).
        delta = (up @ down) * (self.alpha / down.shape[0]) * self.strength[...]
        return weight + _delta_in_our_layout(delta, weight.shape, layout)

    def to_data(self) -> LayerFactors:
        return LayerFactors(np.asarray(self.lora_down[...]), np.asarray(self.lora_up[...]), self.alpha)


class TokenRows(nnx.Module):
    """Deltas on selected rows of a token-embedding table (official ``ReToken``)."""

    def __init__(self, indices, rows, strength: float = 1.0, tokens=None):
        self.indices = tuple(int(i) for i in indices)
        self.tokens = tuple(tokens) if tokens is not None else (None,) * len(self.indices)
        self.embeddings = LoRAParam(jnp.asarray(rows), torch_layout="same", axes=(None, "embed"))
        self.strength = LoRAStrength(jnp.asarray(strength, jnp.float32), torch_layout="same", axes=())
        self.enabled = True

    def add_to(self, table, layout: str):
        rows = self.embeddings[...].astype(jnp.float32) * self.strength[...]
        return table.at[jnp.asarray(self.indices, jnp.int32)].add(rows)

    def to_data(self) -> TokenDeltas:
        return TokenDeltas(np.asarray(self.indices, np.int64), np.asarray(self.embeddings[...]), list(self.tokens))


class AdaptedWeight(nnx.Module):
    """Stands where an adapted weight was; reading it gives the base plus the enabled adapters."""

    def __init__(self, original: nnx.Variable):
        self.original = original
        self.adapters = nnx.Dict()
        self.merged = nnx.data(None)

    @property
    def layout(self) -> str:
        return self.original.get_metadata()["torch_layout"]

    @property
    def shape(self):
        return self.original.shape

    @property
    def dtype(self):
        return self.original.dtype

    @property
    def ndim(self):
        return len(self.original.shape)

    def get_metadata(self):
        return self.original.get_metadata()

    def __getitem__(self, index):
        return self.value[index]

    @property
    def value(self):
        return self.merged[...] if self.merged is not None else self.compute()

    def compute(self):
        """Base + Σ enabled deltas, summed in float32 and cast back to the base dtype."""
        base = self.original[...]
        active = [a for a in self.adapters.values() if a.enabled]
        if not active:
            return base
        weight = base.astype(jnp.float32)
        for adapter in active:
            weight = adapter.add_to(weight, self.layout)
        return weight.astype(base.dtype)


# ------------------------------------------------------------------------------- traversal
@dataclasses.dataclass
class Target:
    key: str  # official key of the weight, e.g. "down_blocks.0.2.attention.attn.out_proj.weight"
    module_name: str  # official module name the filters are matched against
    parent: nnx.Module
    attr: str

    @property
    def variable(self):
        return getattr(self.parent, self.attr)

    @property
    def base(self) -> nnx.Variable:
        var = self.variable
        return var.original if isinstance(var, AdaptedWeight) else var

    def torch_dims(self) -> tuple[int, int]:
        return _torch_dims(tuple(self.base.shape), self.base.get_metadata()["torch_layout"])


def _child_order(module) -> tuple:
    """The official registration order of ``module``'s children, which fixes the order of LoRA factors in
    official files. NNX keeps attributes sorted by name, not in assignment order, so a module whose official
    order is not alphabetical declares it (``official_child_order()``: StageC, StageB, ResBlock,
    TimestepBlock); the others go by name, containers (nnx.List) by index."""
    declared = getattr(module, "official_child_order", None)
    return tuple(declared()) if callable(declared) else ()


def _children(module) -> list[tuple[str, nnx.Module]]:
    order = _child_order(module)
    found = [(name, value) for name, value in vars(module).items()
             if not name.startswith("_") and isinstance(value, nnx.Module) and not isinstance(value, AdaptedWeight)]

    def rank(item):
        name = item[0]
        if name.isdigit():
            return (0, int(name), "")
        return (1, order.index(name) if name in order else len(order), name)
    return sorted(found, key=rank)


def _own_weight(module) -> str | None:
    for attr in WEIGHT_ATTRIBUTES:
        value = vars(module).get(attr)
        if isinstance(value, AdaptedWeight) or (isinstance(value, nnx.Param) and not isinstance(value, LoRAParam)):
            return attr
    return None


def all_targets(module, name: str = "") -> Iterator[Target]:
    """Adaptable weights in official ``modules()`` order: children first, then the module's own."""
    for child_name, child in _children(module):
        yield from all_targets(child, f"{name}.{child_name}" if name else child_name)
    attr = _own_weight(module)
    if attr is not None:
        yield Target(f"{name}.{attr}" if name else attr, name, module, attr)


def _matches(name: str, filters) -> bool:
    return filters is None or any(f in name for f in filters)


def lora_targets(model: nnx.Module, filters: Sequence[str] | None = DEFAULT_FILTERS) -> list[Target]:
    """The weights an official ``apply_lora(model, filters)`` wraps, in its file order.

    Works on ``nnx.eval_shape`` models (shapes only). A matched weight with fewer than 2 dims
    (a LayerNorm scale) is an error, as in the official code; narrow the filters.
    """
    filters = None if filters is None else tuple(filters)
    targets = [t for t in all_targets(model, "") if _matches(t.module_name, filters)]
    for target in targets:
        try:
            target.torch_dims()
        except ValueError as e:
            raise ValueError(f"filters {filters} select {target.key}: {e}; use narrower filters") from e
    return targets


def adapted_weights(model: nnx.Module) -> Iterator[tuple[str, AdaptedWeight]]:
    for target in all_targets(model, ""):
        if isinstance(target.variable, AdaptedWeight):
            yield target.key, target.variable


def _adapted(target: Target) -> AdaptedWeight:
    var = target.variable
    if not isinstance(var, AdaptedWeight):
        var = AdaptedWeight(var)
        setattr(target.parent, target.attr, var)
    return var


def check_adapter_name(weight: AdaptedWeight, name: str, key: str):
    if not isinstance(name, str) or not name:
        raise ValueError(f"a LoRA name must be a non-empty string, got {name!r}")
    if name in weight.adapters:
        raise ValueError(f"{key} already has a LoRA named {name!r}; remove it first or pick another name")


# ------------------------------------------------------------------------------- building
def _factor_axes(target: Target) -> tuple:
    """Logical axes of (PyTorch dim 0, dim 1) of the weight, for sharding its factors."""
    meta = target.base.get_metadata()
    axes = tuple(meta.get("axes") or (None,) * len(target.base.shape))
    layout = meta["torch_layout"]
    if layout in ("linear", "conv"):  # ours (..., in, out) <-> PyTorch (out, in, ...)
        return axes[-1], axes[-2]
    if layout == "conv_transpose":
        return axes[-2], axes[-1]
    return axes[0], axes[1]


def init_lora(model: nnx.Module, name: str, *, filters: Sequence[str] | None = DEFAULT_FILTERS, rank: int = 4,
              alpha: float = 1.0, key=None, dtype=jnp.float32) -> int:
    """Add a fresh, trainable LoRA ``name`` with the official init; returns how many weights it wraps."""
    targets = lora_targets(model, filters)
    if not targets:
        raise ValueError(f"filters {filters} match no module with a weight; official names look like "
                         "'down_blocks.0.2.attention.attn'")
    keys = jax.random.split(jax.random.key(0) if key is None else key, len(targets))
    for target, k in zip(targets, keys):
        weight = _adapted(target)
        check_adapter_name(weight, name, target.key)
        d0, d1 = target.torch_dims()
        down = jnp.zeros((rank, d1), dtype)  # zeros, as the official code (the reverse of the usual init)
        up = jax.random.normal(k, (d0, rank), dtype)
        weight.adapters[name] = LoRAFactors(down, up, alpha, axes=_factor_axes(target))
    return len(targets)


def add_factors(model: nnx.Module, name: str, layers: dict, strength: float = 1.0) -> int:
    """Add ``layers`` (``{official key: LayerFactors}``, whose shapes the caller checked against ``model``: see
    ``weights.lora_weights.attach_lora``) to ``model`` as LoRA ``name``; returns how many."""
    strength = check_strength(f"LoRA {name!r} strength", strength)
    targets = {t.key: t for t in all_targets(model, "")}
    for key, factors in layers.items():
        weight = _adapted(targets[key])
        check_adapter_name(weight, name, key)
        weight.adapters[name] = LoRAFactors(factors.down, factors.up, factors.alpha, strength,
                                            axes=_factor_axes(targets[key]))
    return len(layers)


def lora_layers(model: nnx.Module, name: str) -> dict:
    """``{official key: LayerFactors}`` of LoRA ``name`` in official module order (for saving)."""
    return {key: weight.adapters[name].to_data() for key, weight in adapted_weights(model)
            if name in weight.adapters and isinstance(weight.adapters[name], LoRAFactors)}


# ------------------------------------------------------------------------------- switching
def _with_adapter(model, name: str):
    found = [(key, w) for key, w in adapted_weights(model) if name in w.adapters]
    if not found:
        raise KeyError(f"no LoRA named {name!r} in this model; present: {sorted(lora_names(model))}")
    return found


def lora_names(model: nnx.Module) -> set[str]:
    return {n for _, w in adapted_weights(model) for n in w.adapters}


def refresh_merged(weight: AdaptedWeight):
    if weight.merged is not None:
        weight.merged = MergedWeight(weight.compute(), **weight.get_metadata())


def set_strength(model: nnx.Module, name: str, strength: float):
    strength = check_strength(f"LoRA {name!r} strength", strength)
    for _, weight in _with_adapter(model, name):
        weight.adapters[name].strength.set_value(jnp.asarray(strength, jnp.float32))
        refresh_merged(weight)


def set_enabled(model: nnx.Module, name: str, enabled: bool):
    for _, weight in _with_adapter(model, name):
        weight.adapters[name].enabled = bool(enabled)
        refresh_merged(weight)


def remove_lora(model: nnx.Module, name: str | None = None):
    """Drop LoRA ``name`` (None: all); weights left without adapters get their base Param back."""
    for target in list(all_targets(model, "")):
        weight = target.variable
        if not isinstance(weight, AdaptedWeight):
            continue
        for adapter in [n for n in weight.adapters if name is None or n == name]:
            del weight.adapters[adapter]
        if not len(weight.adapters):
            setattr(target.parent, target.attr, weight.original)
        else:
            refresh_merged(weight)


def merge(model: nnx.Module):
    """Compute every adapted weight once (full-speed sampling); :func:`unmerge` drops the cache."""
    for _, weight in adapted_weights(model):
        weight.merged = MergedWeight(weight.compute(), **weight.get_metadata())


def unmerge(model: nnx.Module):
    for _, weight in adapted_weights(model):
        weight.merged = None


def shallow_copy(module: nnx.Module) -> nnx.Module:
    """New module and variable objects over the same (immutable) arrays: no memory, and changes to
    the copy (adapters, grown tables) leave ``module`` alone. (``nnx.merge`` alone would share the
    variable objects.)"""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def merged_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with the plain structure of the base model and the LoRAs merged in.

    Arrays that no LoRA touches are shared with ``model``; ``model`` itself is unchanged.
    """
    copy = shallow_copy(model)
    for target in list(all_targets(copy, "")):
        weight = target.variable
        if isinstance(weight, AdaptedWeight):
            setattr(target.parent, target.attr, nnx.Param(weight.compute(), **weight.original.get_metadata()))
    return copy
