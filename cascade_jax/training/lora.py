"""LoRA training task (official ``train/train_c_lora.py``), ``stage: c_lora``.

The Stage C task's data and loss, with a LoRA on Stage C (``module_filters``, ``rank``; official
init and scale, see ``cascade_jax.models.lora``) and token-row deltas on the text encoder
(``train_tokens``: new tokens added to the tokenizer with rows initialised from a regex, existing
ones selected by regex; see ``cascade_jax.models.lora_tokens``).

Done better than the official script: only the LoRA factors and token deltas (``LoRAParam``) get
gradients and optimizer state — Stage C and the text encoder are frozen and stay bit-identical
(the official script leaves Stage C's ``requires_grad`` on and computes its gradients). The text
conditioning is differentiated (for the token deltas) while EfficientNet and CLIP-L are not.
Stage C runs with its configured dropout, as in the official trainer.

At every checkpoint (``save_every``) and at the end, the LoRA file is written to
``output_path/experiment_id/lora/lora_{step}.safetensors`` and ``lora.safetensors``: the
official format plus the metadata (token strings, settings, model config) that make it
self-contained; ``lora_checkpoint_path`` starts from such a file.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.lora import DEFAULT_FILTERS, LayerFactors, LoRAParam, TokenDeltas, init_lora, lora_layers
from cascade_jax.models.lora_tokens import add_train_tokens, attach_token_rows, init_token_rows, token_deltas, \
    token_embedding
from cascade_jax.models.unet_stack import unstack_flat
from cascade_jax.nn.params import official_key
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.hooks import Hook, StepInfo
from cascade_jax.training.stage_c import StageCTask, encode_text
from cascade_jax.training.task import TrainModules, register_task
from cascade_jax.weights.lora_weights import LoRAWeights, attach_lora

NAME = "lora"  # the adapter name inside the models


class LoRAOutput:
    """Writing a task's trained LoRA as a file (``write_lora``): the part of the LoRA task that the LCM-LoRA
    distillation tasks share, whichever stage's generator (``generator_model``) carries the LoRA."""

    def _record_layout(self, modules):
        """What a LoRA file needs beside the trained values: key order, alphas, token ids and strings."""
        layers = lora_layers(modules.generator, NAME)
        self.alphas = {key: factors.alpha for key, factors in layers.items()}
        self.tokens = token_deltas(token_embedding(modules.text_encoder), NAME)

    def lora_weights(self, params, stack_layouts: dict | None = None) -> LoRAWeights:
        """The LoRA held by the trainable ``params`` (an ``nnx.State`` of LoRAParam, host or device);
        ``stack_layouts``: the run's (``Run.stack_layouts``) when it trained with scan_blocks."""
        values = {path: np.asarray(jax.device_get(var[...])) for path, var in nnx.to_flat_state(params)}
        if (stack_layouts or {}).get("generator"):  # scan_blocks: per-block paths again
            values = unstack_flat(values, stack_layouts["generator"], prefix=("generator",))
        # Matched by official key, not by parsing the key into a path: a Sequential's children are named "0", "1"
        # (strings) in the state, so "channelwise.0.weight" is not the path (..., "channelwise", 0, "weight").
        factors = {}
        for path, value in values.items():
            if path[0] == "generator" and path[-3:-1] == ("adapters", NAME):
                factors.setdefault(official_key(path[1:-3]), {})[path[-1]] = value
        layers = {key: LayerFactors(factors[key]["lora_down"], factors[key]["lora_up"], alpha)
                  for key, alpha in self.alphas.items()}
        tokens = None
        if self.tokens is not None:
            rows = next(v for p, v in values.items() if p[0] == "text_encoder" and p[-1] == "embeddings")
            tokens = TokenDeltas(self.tokens.indices, rows, self.tokens.tokens)
        return LoRAWeights(layers, tokens, self.filters, self.train_tokens)

    def write_lora(self, cfg: TrainConfig, params, step: int, stack_layouts: dict | None = None) -> Path | None:
        """Write ``lora_{step}.safetensors`` and ``lora.safetensors`` (process 0); returns the step's file.
        ``stack_layouts``: the run's (``Run.stack_layouts``), required when it trained with scan_blocks."""
        from cascade_jax.weights.lora_files import save_official

        if cfg.scan_blocks and not stack_layouts:
            raise ValueError("write_lora: the run trained with scan_blocks; pass its stack_layouts (Run.stack_layouts) "
                             "so that the LoRA is written per block")
        if jax.process_index() != 0:
            return None
        folder = storage.join(cfg.output_path, cfg.experiment_id, "lora")  # a local folder or a bucket URL
        if not storage.is_url(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        lora = self.lora_weights(params, stack_layouts)
        model_config = {"model": self.generator_model, "config": self.generator_config(cfg)}
        path = storage.join(folder, f"lora_{step}.safetensors")
        save_official(path, lora, model_config)
        save_official(storage.join(folder, "lora.safetensors"), lora, model_config)
        return path if storage.is_url(path) else Path(path)


class LoRATask(LoRAOutput, StageCTask):
    def build(self, cfg: TrainConfig) -> TrainModules:
        modules = super().build(cfg)
        self.filters = tuple(cfg.lora.module_filters) if cfg.lora.module_filters is not None else DEFAULT_FILTERS
        self.train_tokens = [tuple(t) for t in cfg.lora.train_tokens]
        embedding = token_embedding(modules.text_encoder)
        token_ids = add_train_tokens(self.tokenizer, embedding, self.train_tokens)
        if cfg.lora.lora_checkpoint_path is not None:
            self._attach_file(cfg, modules, embedding, token_ids)
        else:
            init_lora(modules.generator, NAME, filters=self.filters, rank=cfg.lora.rank, key=jax.random.key(cfg.seed))
            init_token_rows(embedding, NAME, token_ids, self.tokenizer)
        self._record_layout(modules)
        return modules

    def adapt_abstract(self, modules: TrainModules, cfg: TrainConfig) -> TrainModules:
        """The dry run's LoRA: factors of the configured rank and one (zero) row per train_tokens entry
        (abstract tables have no values to select or average rows from)."""
        filters = tuple(cfg.lora.module_filters) if cfg.lora.module_filters is not None else DEFAULT_FILTERS
        init_lora(modules.generator, NAME, filters=filters, rank=cfg.lora.rank)
        if cfg.lora.train_tokens:
            init_token_rows(token_embedding(modules.text_encoder), NAME, list(range(len(cfg.lora.train_tokens))))
        return modules

    def _attach_file(self, cfg, modules, embedding, token_ids):
        from cascade_jax.weights.lora_files import load_lora

        lora = load_lora(cfg.lora.lora_checkpoint_path, modules.generator)
        attach_lora(modules.generator, NAME, lora)
        rows = [] if lora.tokens is None else sorted(lora.tokens.indices.tolist())
        if rows != sorted(token_ids):
            raise ValueError(f"{cfg.lora.lora_checkpoint_path}: its token rows {rows} are not the rows train_tokens "
                             f"selects ({sorted(token_ids)}); use the train_tokens it was trained with")
        if lora.tokens is not None:
            attach_token_rows(embedding, NAME, lora.tokens)

    def trainable(self, cfg: TrainConfig):
        return nnx.OfType(LoRAParam)

    def exports(self, cfg: TrainConfig) -> bool:
        return False  # its product is the LoRA file, not a weights folder

    def output_hooks(self, cfg: TrainConfig) -> list:
        return [LoRAFiles(self, cfg)]

    def conditions(self, modules, batch):
        # The text encoding keeps its gradient (to the token deltas); the rest is constant.
        x0, _, _, clip_img = super().conditions(modules, batch)
        clip_text, pooled = encode_text(modules.text_encoder, batch["input_ids"], batch["attention_mask"])
        return x0, clip_text, pooled, clip_img

class LoRAFiles(Hook):
    """Writes the LoRA file (``write_lora``) every ``save_every`` updates and when the run completes; ``params_of``
    picks what to write from the state (the trained factors by default)."""

    def __init__(self, task: LoRATask, cfg: TrainConfig, params_of=None, label: str = "LoRA"):
        super().__init__(every=cfg.save_every, at_end=True)
        self.task, self.cfg, self.label = task, cfg, label
        self.params_of = params_of or (lambda state: state.params)
        self.path = None
        folder = storage.join(cfg.output_path, cfg.experiment_id, "lora")
        self.start_line = f"{label} files: {folder} (every {cfg.save_every} updates and at the end)"

    def run(self, info: StepInfo):
        self.last_step = info.step
        self.path = self.task.write_lora(self.cfg, self.params_of(info.state), info.step, info.run.stack_layouts)
        return self.path

    def summary(self) -> str | None:
        return None if self.path is None else f"{self.label} written to {self.path}"


register_task("c_lora", LoRATask)
