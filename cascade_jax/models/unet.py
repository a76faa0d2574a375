"""The U-Net trunk shared by Stage B and Stage C (official ``StageB``/``StageC`` minus conditioning).

Both official models build the same down/up ladder of ResBlock / TimestepBlock / AttnBlock /
FeedForwardBlock levels and run it with the same ``_down_encode`` / ``_up_decode`` loops; they
differ only in how a level is rescaled and in their conditioning. :class:`CascadeUNet` holds the
ladder (attribute names are the official ones, so module paths are checkpoint keys) and the
subclasses pass the rescaling layers in.

Training options, neither of which changes the parameters or the checkpoint keys:

* dropout: ``model.train()`` turns the official dropout on (``model.eval()`` off; a fresh model
  is in inference mode) and the forward then needs ``rngs=`` (an ``nnx.Rngs`` with a
  ``dropout`` stream, or a key). Each block draws ``fold_in(key, its visiting index)``.
* remat: ``remat=`` at construction or :meth:`CascadeUNet.set_remat` recomputes every block
  in the backward pass (``jax.checkpoint`` per block) under a named ``jax.checkpoint_policies``
  policy; ``"full"`` (or True) saves nothing inside a block.
* scan: :meth:`CascadeUNet.set_scan_blocks` runs each level's repeated units as one ``lax.scan``
  (``unet_scan``): same parameters and results, a much smaller program to compile.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.config_forms import FLAG, INT, NUMBER, TEXT, DownUp, Either, Letters, Seq, optional, \
    per_level, scalar_or_per_level
from cascade_jax.nn.blocks import AttnBlock, FeedForwardBlock, ResBlock, TimestepBlock, clip_norm, r_embedding
from cascade_jax.nn.functional import resize_bilinear_align_corners
from cascade_jax.models.unet_scan import runs, scan_stacked, scan_units, unit_period
from cascade_jax.models.unet_stack import StackedUnits
from cascade_jax.nn.layers import Conv2d, Identity, LayerNorm2d, PixelShuffle, PixelUnshuffle, Sequential


# What the official StageB/StageC constructors accept for their shared arguments (``CONFIG_FORMS``).
UNET_CONFIG_FORMS = {
    "c_in": INT, "c_out": INT, "c_r": INT, "patch_size": INT, "c_cond": INT, "kernel_size": INT, "c_clip_seq": INT,
    "c_hidden": Seq(INT, min_length=1), "nhead": per_level(INT), "level_config": per_level(Letters("CTAF")),
    "blocks": DownUp(INT), "block_repeat": optional(DownUp(INT)),
    "dropout": scalar_or_per_level(NUMBER), "self_attn": scalar_or_per_level(FLAG),
    # a list: a bare string would be read letter by letter as condition names ('sca' -> s, c, a)
    "t_conds": Seq(TEXT),
    "remat": optional(Either(FLAG, TEXT)),  # this port's option (see remat_policy)
}


def expand_per_level(value, levels: int) -> list:
    """The official ``dropout``/``self_attn`` convention: a scalar applies to every level."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def as_batch_vector(value, batch: int):
    """r / sca / crp as a float32 (B,) vector; a scalar is broadcast over the batch."""
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32).reshape(-1), (batch,))


def as_token_sequence(embedding):
    """A pooled / image embedding as (B, S, D): (B, D) means one token (the official code crashes on it)."""
    return embedding[:, None, :] if embedding.ndim == 2 else embedding


def remat_policy(remat):
    """``(enabled, policy)`` for a ``remat`` option: None/False, True/"full", or a ``jax.checkpoint_policies`` name."""
    if remat in (None, False, "none"):
        return False, None
    if remat in (True, "full", "blocks"):
        return True, None
    policy = getattr(jax.checkpoint_policies, str(remat), None)
    if policy is None or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if n.endswith("saveable"))
        raise ValueError(f"remat={remat!r} is not a policy; use None, 'full' or one of {names}")
    if remat in ("save_only_these_names", "save_any_names_but_these", "save_and_offload_only_these_names"):
        raise ValueError(f"remat={remat!r} needs arguments; pick a named policy such as 'dots_saveable'")
    return True, policy


def dropout_key(rngs):
    """The dropout key of one forward: from an ``nnx.Rngs`` (its ``dropout`` stream), a key, or None."""
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    return rngs.dropout()


def map_to_tokens(mapper, embedding, c_clip_seq: int):
    """Each input token becomes ``c_clip_seq`` condition tokens (official ``.view(B, S*seq, -1)``)."""
    embedding = as_token_sequence(embedding)
    mapped = mapper(embedding)
    return mapped.reshape(mapped.shape[0], embedding.shape[1] * c_clip_seq, -1)


class CascadeUNet(nnx.Module):
    """Base of StageB/StageC: patch embedding, level ladder, output head and their forward loops."""

    remat = None
    scan_blocks = False
    unroll_stacked = False  # run stacked units (unet_stack) as straight-line code: planning's estimate only
    CONDITION_MAPPERS: tuple = ()  # each stage's conditioning mappers, in the official registration order

    def official_child_order(self) -> tuple:
        """The official module's registration order of its children (NNX sorts attributes by name): it fixes
        the order of ``modules()``, hence of the factors in an official LoRA file (``models.lora``)."""
        return self.CONDITION_MAPPERS + ("embedding", "down_blocks", "down_downscalers", "down_repeat_mappers",
                                         "up_blocks", "up_upscalers", "up_repeat_mappers", "clf")

    def set_remat(self, remat):
        """Recompute each block in the backward pass (see :func:`remat_policy` for the values)."""
        remat_policy(remat)
        self.remat = remat

    def set_scan_blocks(self, scan: bool = True):
        """Run each level's repeated units as one scan over their stacked parameters (``unet_scan``): the same
        results, a program (and compile) the size of one unit per run instead of all of them."""
        self.scan_blocks = bool(scan)

    def _init_io(self, c_in, c_out, c_hidden0, patch_size, *, rngs):
        self.embedding = Sequential(PixelUnshuffle(patch_size),
                                    Conv2d(c_in * patch_size ** 2, c_hidden0, 1, rngs=rngs), LayerNorm2d(eps=1e-6))
        self.clf = Sequential(LayerNorm2d(eps=1e-6), Conv2d(c_hidden0, c_out * patch_size ** 2, 1, rngs=rngs),
                              PixelShuffle(patch_size))

    def _init_levels(self, *, c_hidden, nhead, blocks, block_repeat, level_config, c_cond, c_r, t_conds,
                     kernel_size, dropout, self_attn, make_downscaler: Callable, make_upscaler: Callable, rngs):
        """Build the official down/up ladder; ``make_*scaler(c_from, c_to, level)`` give the rescalers."""
        levels = len(c_hidden)
        self.c_r, self.t_conds = c_r, tuple(t_conds)
        dropout, self_attn = expand_per_level(dropout, levels), expand_per_level(self_attn, levels)
        # Official ``block_repeat=None`` builds no mappers at all; all-ones is the same key set.
        block_repeat = block_repeat or [[1] * levels, [1] * levels]

        def block(kind, i, c_skip=0):
            return _make_block(kind, c_hidden[i], nhead[i], c_skip=c_skip, c_cond=c_cond, c_r=c_r, t_conds=t_conds,
                               kernel_size=kernel_size, dropout=dropout[i], self_attn=self_attn[i], rngs=rngs)

        down_blocks, down_scalers, down_mappers = [], [], []
        for i in range(levels):
            down_scalers.append(make_downscaler(c_hidden[i - 1], c_hidden[i], i - 1) if i > 0 else Identity())
            down_blocks.append(nnx.List([block(kind, i) for _ in range(blocks[0][i]) for kind in level_config[i]]))
            down_mappers.append(_repeat_mappers(c_hidden[i], block_repeat[0][i], rngs))
        up_blocks, up_scalers, up_mappers = [], [], []
        for i in reversed(range(levels)):
            up_scalers.append(make_upscaler(c_hidden[i], c_hidden[i - 1], i - 1) if i > 0 else Identity())
            # The first block of every level but the deepest receives the skip connection.
            c_skip = c_hidden[i] if i < levels - 1 else 0
            up_blocks.append(nnx.List([block(kind, i, c_skip if j == k == 0 else 0)
                                       for j in range(blocks[1][::-1][i]) for k, kind in enumerate(level_config[i])]))
            up_mappers.append(_repeat_mappers(c_hidden[i], block_repeat[1][::-1][i], rngs))
        self.down_blocks, self.down_downscalers = nnx.List(down_blocks), nnx.List(down_scalers)
        self.down_repeat_mappers = nnx.List(down_mappers)
        self.up_blocks, self.up_upscalers = nnx.List(up_blocks), nnx.List(up_scalers)
        self.up_repeat_mappers = nnx.List(up_mappers)

    def _embed_noise_levels(self, r, conds: dict, batch: int):
        """float32 (B, c_r·(1+len(t_conds))): r then each t_cond (zeros where not given), as officially."""
        unknown = sorted(set(conds) - set(self.t_conds))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown conditions {unknown}; this model's t_conds are "
                            f"{list(self.t_conds)}")
        values = [r] + [conds.get(name) for name in self.t_conds]
        return jnp.concatenate([r_embedding(as_batch_vector(0.0 if v is None else v, batch), self.c_r)
                                for v in values], axis=1)

    def _run_unet(self, x, r_embed, clip, cnet: Sequence | None = None, key=None):
        """Embedded input → ladder → output head; ``cnet`` residuals are handed to ResBlocks in visiting order.

        ``key`` (dropout, training mode only) is folded with each block's visiting index.
        """
        residuals = iter(cnet) if cnet is not None else None
        run = _BlockRunner(key, self.remat)
        level_outputs = self._down_encode(x, r_embed, clip, residuals, run)
        return self.clf(self._up_decode(level_outputs, r_embed, clip, residuals, run))

    def _down_encode(self, x, r_embed, clip, residuals: Iterator | None, run):
        level_outputs = []
        for level_blocks, downscaler, repeat_mappers in zip(self.down_blocks, self.down_downscalers,
                                                            self.down_repeat_mappers):
            x = downscaler(x)
            # block_repeat: the same blocks run again, a 1x1 mapper between passes.
            for rep in range(len(repeat_mappers) + 1):
                x = self._level_pass(list(level_blocks), x, r_embed, clip, residuals, run)
                if rep < len(repeat_mappers):
                    x = repeat_mappers[rep](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs, r_embed, clip, residuals: Iterator | None, run):
        x = level_outputs[0]
        for i, (level_blocks, upscaler, repeat_mappers) in enumerate(zip(self.up_blocks, self.up_upscalers,
                                                                         self.up_repeat_mappers)):
            # Every level but the deepest hands its first block (a ResBlock) the skip connection.
            skip = level_outputs[i] if i > 0 and isinstance(level_blocks[0], ResBlock) else None
            for rep in range(len(repeat_mappers) + 1):
                x = self._level_pass(list(level_blocks), x, r_embed, clip, residuals, run, skip)
                if rep < len(repeat_mappers):
                    x = repeat_mappers[rep](x)
            x = upscaler(x)
        return x

    def _level_pass(self, blocks: list, x, r_embed, clip, residuals: Iterator | None, run, skip=None):
        """One pass over a level's blocks (``skip`` goes to the first); with ``scan_blocks``, runs of
        identical units as scans (``unet_scan``)."""
        apply = lambda b, h, index: run.apply(b, h, r_embed, clip, None, index)  # noqa: E731
        if any(isinstance(b, StackedUnits) for b in blocks):  # unet_stack.stack_units: stacked parameters
            for k, element in enumerate(blocks):
                if not isinstance(element, StackedUnits):
                    x = _visit(element, x, r_embed, clip, residuals, run, skip if k == 0 else None)
                    continue
                splits = [nnx.split(b) for b in element.blocks]
                x = scan_stacked([g for g, _ in splits], [s for _, s in splits], element.count,
                                 [isinstance(b, ResBlock) for b in element.blocks], x, residuals, run, apply,
                                 _add_control, unroll=self.unroll_stacked)
            return x
        if not self.scan_blocks:
            for k, block in enumerate(blocks):
                x = _visit(block, x, r_embed, clip, residuals, run, skip if k == 0 else None)
            return x
        period = unit_period(blocks)
        for first, count in runs(blocks, period, first_alone=skip is not None):
            part = blocks[first * period:(first + count) * period]
            if count == 1:
                for k, block in enumerate(part):
                    x = _visit(block, x, r_embed, clip, residuals, run, skip if first == k == 0 else None)
                continue
            units = [part[u * period:(u + 1) * period] for u in range(count)]
            x = scan_units(units, x, residuals, run, apply, _add_control, lambda b: isinstance(b, ResBlock))
        return x


def _make_block(kind, c, nhead, *, c_skip, c_cond, c_r, t_conds, kernel_size, dropout, self_attn, rngs):
    if kind == "C":
        return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropout, rngs=rngs)
    if kind == "A":
        return AttnBlock(c, c_cond, nhead, self_attn=self_attn, dropout=dropout, rngs=rngs)
    if kind == "F":
        return FeedForwardBlock(c, dropout=dropout, rngs=rngs)
    if kind == "T":
        return TimestepBlock(c, c_r, conds=t_conds, rngs=rngs)
    raise ValueError(f"block type {kind!r} in level_config is not supported; use C, A, F or T")


def _repeat_mappers(c, repeats, rngs):
    return nnx.List([Conv2d(c, c, 1, rngs=rngs) for _ in range(repeats - 1)])


def _visit(block, x, r_embed, clip, residuals: Iterator | None, run, skip=None):
    """One block of a level pass, unrolled: the skip's size fixed, its ControlNet residual added."""
    if skip is not None and x.shape[1:3] != skip.shape[1:3]:
        # Odd sizes: the upscaled map is one pixel off its skip connection.
        x = resize_bilinear_align_corners(x, skip.shape[1:3])
    if isinstance(block, ResBlock):
        x = _add_control(x, residuals)
    return run(block, x, r_embed, clip, skip)


class _BlockRunner:
    """Calls one block: hands it its dropout key (``fold_in(key, visiting index)``) and, with remat, runs it
    under ``jax.checkpoint``."""

    def __init__(self, key, remat):
        self.key, self.count = key, itertools.count()
        self.remat, self.policy = remat_policy(remat)

    def advance(self, n: int) -> int:
        """Reserve the next ``n`` visiting indices (a scanned run); returns the first."""
        first = next(self.count)
        for _ in range(n - 1):
            next(self.count)
        return first

    def __call__(self, block, x, r_embed, clip, skip=None):
        return self.apply(block, x, r_embed, clip, skip, next(self.count))

    def apply(self, block, x, r_embed, clip, skip, index):
        """``block`` at visiting ``index`` (an int, or a traced int32 inside a scan)."""
        key = jax.random.fold_in(self.key, index) if self.key is not None else None
        if not self.remat:
            return _apply(block, x, r_embed, clip, skip, key)
        graphdef, state = nnx.split(block)

        def run(state, x, r_embed, clip, skip, key):
            return _apply(nnx.merge(graphdef, state), x, r_embed, clip, skip, key)

        return jax.checkpoint(run, policy=self.policy)(state, x, r_embed, clip, skip, key)


def _apply(block, x, r_embed, clip, skip=None, key=None):
    if isinstance(block, ResBlock):
        return block(x, skip, key=key)
    if isinstance(block, AttnBlock):
        return block(x, clip, key=key)
    if isinstance(block, TimestepBlock):
        return block(x, r_embed)
    return block(x, key=key)


def _add_control(x, residuals: Iterator | None):
    """Add the next ControlNet residual (resized to x) to a ResBlock input; None entries add nothing."""
    residual = next(residuals, None) if residuals is not None else None
    if residual is None:
        return x
    return x + resize_bilinear_align_corners(residual, x.shape[1:3]).astype(x.dtype)


def embed_condition_tokens(*token_groups):
    """Concatenate condition token groups and apply the official affine-free clip LayerNorm."""
    return clip_norm(jnp.concatenate(token_groups, axis=1))
