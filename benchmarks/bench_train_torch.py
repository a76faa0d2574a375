"""One training update, JAX against PyTorch: a small Stage C and Stage B, float32, same weights and batch.

JAX runs the library's step (``cascade_jax.training.step.train_step``: value and gradient of the official
GDF loss, torch-style clipping to norm 1, AdamW with wd 0.01, jitted, the state donated). PyTorch runs
diffusers' ``StableCascadeUNet`` holding a copy of the same weights, the official GDF training math
(``train/base.py`` + ``gdf/``: cosine schedule, VP scaler, epsilon target, P2 weight) written in torch,
``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` (the official trainer's optimizer, torch defaults). Both see
the same x0, t, noise and conditioning (numpy draws, NHWC for JAX, NCHW for PyTorch), so their first losses
agree (recorded) and every later update is the same arithmetic on the same numbers.

Timed alternately (A B, B A, ...) in one process: the whole update, and to say where the time goes, the
forward alone (the loss), forward + backward (loss and gradients) and the optimizer alone (clipping and AdamW on
given gradients); then PyTorch once more on one thread (a busy machine stalls a multi-threaded OpenMP team at
every op; one thread shows how much of PyTorch's time that is).

    python benchmarks/run_cpu.py --only train_torch
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import alternate, log, other_cpu_load, ratio, rss_gb, summarize  # noqa: E402

# Small configs of the released architectures (level mix, attention, repeat mappers of Stage B lite), sized so
# that one update takes a fraction of a second on 2 CPU cores. Dropout 0: both sides are deterministic.
SMALL = {
    "stage_c": dict(
        config=dict(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=128, c_hidden=[128, 128], nhead=[2, 2],
                    blocks=[[1, 2], [2, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
                    c_clip_text=128, c_clip_text_pooled=128, c_clip_img=64, c_clip_seq=4, kernel_size=3,
                    dropout=[0.0, 0.0], self_attn=True, t_conds=["sca", "crp"], switch_level=[False]),
        batch=2, latent=(16, 16, 16), label="small Stage C (2 levels of 128, 6 units), 16² latent"),
    "stage_b": dict(
        config=dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=128, c_hidden=[32, 64, 128, 128],
                    nhead=[-1, -1, 2, 2], blocks=[[1, 1, 2, 1], [1, 2, 1, 1]], block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
                    level_config=["CT", "CT", "CTA", "CTA"], c_clip=128, c_clip_seq=4, c_effnet=16, c_pixels=3,
                    kernel_size=3, dropout=[0.0, 0.0, 0.0, 0.0], self_attn=True, t_conds=["sca"]),
        batch=2, latent=(32, 32, 4), label="small Stage B (lite's four levels, 32-128 wide), 32² latent"),
}
TEXT_TOKENS = 77


def draw_batch(model_name: str, config: dict, batch: int, latent: tuple, seed: int = 0) -> dict:
    """numpy NHWC training inputs: clean latent, t as the official trainer draws it, noise, conditioning."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    out = {"x0": normal(batch, *latent), "epsilon": normal(batch, *latent),
           "t": np.clip(1 - rng.uniform(size=batch) + 0.001, 0.001, 1).astype(np.float32)}
    if model_name == "stage_c":
        out.update(clip_text=normal(batch, TEXT_TOKENS, config["c_clip_text"]),
                   clip_text_pooled=normal(batch, 1, config["c_clip_text_pooled"]),
                   clip_img=normal(batch, 1, config["c_clip_img"]))
    else:
        side = math.ceil(latent[0] * 4 / 42.67)  # the Stage C latent of the same image
        out.update(effnet=normal(batch, side, side, config["c_effnet"]), clip=normal(batch, 1, config["c_clip"]))
    return out


# ---- JAX: the library's step ---------------------------------------------------------------------

class FixedNoiseTask:
    """The task contract ``train_step`` calls, with t and noise taken from the batch (PyTorch gets the same)."""

    uses_ema_target = False

    def __init__(self, model_name: str):
        self.model_name = model_name

    def loss(self, modules, batch, key, loss_state, cfg):
        from cascade_jax.training.losses import denoising_loss, make_gdf

        del key
        generator = modules.generator
        conditions = ((batch["clip_text"], batch["clip_text_pooled"], batch["clip_img"])
                      if self.model_name == "stage_c" else (batch["effnet"], batch["clip"]))
        return denoising_loss(lambda noised, r: generator(noised, r, *conditions), batch["x0"], batch["t"],
                              batch["epsilon"], make_gdf(False), loss_state)


def jax_runs(model_name: str, model, batch: dict) -> tuple[dict, dict]:
    """({"update", "forward_backward", "forward"}: blocking callables, info) for the library's step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cascade_jax.training import load_config
    from cascade_jax.training.optimizer import make_optimizer
    from cascade_jax.training.state import init_state
    from cascade_jax.training.step import make_loss_fn, train_step
    from cascade_jax.training.task import TrainModules

    cfg = load_config("tiny_c", ["lr=1.0e-4", "warmup_updates=0", "compute_dtype=float32", "grad_accum_steps=1"])
    task, tx = FixedNoiseTask(model_name), make_optimizer(cfg)
    graphdef, params, frozen = nnx.split(TrainModules(generator=model), nnx.Param, ...)
    state = {"s": init_state(cfg, params, tx)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    update = jax.jit(lambda s, f, b: train_step(s, f, b, task=task, cfg=cfg, graphdef=graphdef, tx=tx),
                     donate_argnums=(0,)).lower(state["s"], frozen, batch).compile()
    info = {"compile_update_s": time.perf_counter() - start}
    loss_fn = make_loss_fn(task, cfg, graphdef)
    forward = jax.jit(lambda p: loss_fn(p, frozen, batch, None, None)[0]).lower(params).compile()
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, frozen, batch, None, None)[0])).lower(params).compile()
    grads = grad(params)
    optimizer = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0])).lower(
        grads, state["s"].opt_state, params).compile()
    info["compile_all_s"] = time.perf_counter() - start
    losses = []

    def run_update():
        state["s"], metrics = update(state["s"], frozen, batch)
        losses.append(float(metrics["loss_weighted"]))  # blocks until the update is done

    runs = {"update": run_update,
            "forward": lambda: forward(state["s"].params).block_until_ready(),
            "forward_backward": lambda: jax.block_until_ready(grad(state["s"].params)),
            "optimizer": lambda: jax.block_until_ready(optimizer(grads, state["s"].opt_state, state["s"].params))}
    info["losses"] = losses
    return runs, info


# ---- PyTorch: diffusers' U-Net, the official GDF math, torch AdamW ----------------------------------

def torch_gdf_loss(model_fn, x0, t, epsilon):
    """The official GDF training loss (CosineSchedule(clamp_range=[1e-4, 0.9999]), VPScaler, EpsilonTarget,
    CosineTNoiseCond, P2LossWeight), mean over the batch."""
    import torch

    s = torch.tensor([0.008])
    min_var = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2

    def logsnr(t):
        var = (torch.cos((s + t) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / min_var).clamp(0.0001, 0.9999)
        return (var / (1 - var)).log()

    limits = logsnr(torch.tensor([1.0, 0.0])).tolist()
    lsnr = logsnr(t.clamp(0, 1)).clamp(*limits)
    a2 = lsnr.sigmoid()
    a, b = a2.sqrt().view(-1, 1, 1, 1), (1 - a2).sqrt().view(-1, 1, 1, 1)
    noise_cond = ((a2.clamp(0, 1) * min_var) ** 0.5).acos() / (math.pi * 0.5) * (1 + s) - s
    pred = model_fn(x0 * a + epsilon * b, noise_cond)
    loss = torch.nn.functional.mse_loss(pred, epsilon, reduction="none").mean(dim=[1, 2, 3])
    return (loss * (1.0 + lsnr.exp()) ** -1.0).mean()


def torch_runs(model_name: str, unet, batch: dict) -> tuple[dict, dict]:
    """The same three callables for the official PyTorch update."""
    import torch

    for p in unet.parameters():  # own, writable memory: the optimizer updates in place
        p.data = p.data.clone()
    unet.train().requires_grad_(True)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    x0, eps, t = nchw(batch["x0"]), nchw(batch["epsilon"]), torch.from_numpy(batch["t"])
    if model_name == "stage_c":
        pooled, kwargs = torch.from_numpy(batch["clip_text_pooled"]), dict(
            clip_text=torch.from_numpy(batch["clip_text"]), clip_img=torch.from_numpy(batch["clip_img"]))
    else:
        pooled, kwargs = torch.from_numpy(batch["clip"]), dict(effnet=nchw(batch["effnet"]))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-8)
    loss_of = lambda: torch_gdf_loss(lambda noised, r: unet(noised, r, pooled, **kwargs).sample, x0, t, eps)  # noqa
    losses = []

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss

    def update():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))

    def forward():
        with torch.no_grad():
            loss_of()

    def clip_and_step():  # on the gradients the last backward left
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    return {"update": update, "forward": forward, "forward_backward": forward_backward,
            "optimizer": clip_and_step}, {"losses": losses}


# ---- the case ----------------------------------------------------------------------------------------

def run_case(model_name: str, rounds: int = 5, phase_rounds: int = 3) -> dict:
    import torch

    from benchmarks import shared_weights

    spec = SMALL[model_name]
    result = {"label": spec["label"], "model": model_name, "batch": spec["batch"],
              "latent_shape_nhwc": [spec["batch"], *spec["latent"]], "dtype": "float32",
              "torch_threads": torch.get_num_threads(), "load_before": other_cpu_load()}
    model = shared_weights.fast_random_model(model_name, spec["config"], seed=0)
    result["params"] = shared_weights.param_count(model)
    unet = shared_weights.diffusers_unet(model_name, spec["config"], model, share=False)
    batch = draw_batch(model_name, spec["config"], spec["batch"], spec["latent"])
    jax_side, jax_info = jax_runs(model_name, model, batch)
    torch_side, torch_info = torch_runs(model_name, unet, batch)
    result.update(jax_compile_update_s=jax_info["compile_update_s"], jax_compile_all_s=jax_info["compile_all_s"])
    # First update of each untimed (allocations, torch's lazy AdamW state); its losses are the parity check.
    jax_side["update"](), torch_side["update"]()
    samples = alternate({"jax": jax_side["update"], "torch": torch_side["update"]}, rounds)
    result["jax"], result["torch"] = summarize(samples["jax"]), summarize(samples["torch"])
    result["ratio_jax_over_torch"] = ratio(result["jax"], result["torch"])
    first = (jax_info["losses"][0], torch_info["losses"][0])
    last = (jax_info["losses"][-1], torch_info["losses"][-1])
    result["first_loss"] = {"jax": first[0], "torch": first[1], "rel_diff": abs(first[0] - first[1]) / abs(first[1])}
    result["loss_after_updates"] = {"updates": len(jax_info["losses"]), "jax": last[0], "torch": last[1],
                                    "rel_diff": abs(last[0] - last[1]) / abs(last[1])}
    result["phases"] = phases(jax_side, torch_side, phase_rounds)
    result["torch_1_thread"] = one_thread(jax_side, torch_side, phase_rounds)
    result.update(rss_gb=rss_gb(), load_after=other_cpu_load())
    return result


def phases(jax_side: dict, torch_side: dict, rounds: int) -> dict:
    """Median seconds of the forward (the loss), the backward (loss and gradients minus the forward) and the
    optimizer (clipping and AdamW on given gradients) per framework, and JAX minus PyTorch for each."""
    out = {}
    for name in ("forward", "forward_backward", "optimizer"):
        samples = alternate({"jax": jax_side[name], "torch": torch_side[name]}, rounds)
        out[name] = {k: summarize(v)["median_s"] for k, v in samples.items()}
    split = {side: {"forward_s": out["forward"][side],
                    "backward_s": out["forward_backward"][side] - out["forward"][side],
                    "optimizer_s": out["optimizer"][side]} for side in ("jax", "torch")}
    split["jax_minus_torch_s"] = {k: split["jax"][k] - split["torch"][k] for k in split["jax"]}
    return split


def one_thread(jax_side: dict, torch_side: dict, rounds: int) -> dict:
    """PyTorch's update on one thread against JAX's: on a busy machine an OpenMP team waits at every op's barrier
    for a descheduled thread, which one thread never does (compare with the main row to see the cost)."""
    import torch

    threads = torch.get_num_threads()

    def torch_one():
        torch.set_num_threads(1)
        try:
            torch_side["update"]()
        finally:
            torch.set_num_threads(threads)

    samples = alternate({"jax": jax_side["update"], "torch": torch_one}, rounds)
    out = {k: summarize(v) for k, v in samples.items()}
    return {**out, "ratio_jax_over_torch": ratio(out["jax"], out["torch"])}


def run_train_torch_section(budget, names=("stage_c", "stage_b"), rounds: int = 5) -> list[dict]:
    results = []
    for name in names:
        if budget.dry_run:
            results.append({"label": SMALL[name]["label"], "model": name, "skipped": "dry run"})
            continue
        if not budget.fits(120.0):  # compiles 40-100 s on a quiet 2-core machine, 2-4 min under load
            results.append({"label": SMALL[name]["label"], "model": name,
                            "skipped": f"{budget.remaining():.0f} s of the budget left, about 120 s needed"})
            continue
        log(f"train vs torch: {SMALL[name]['label']}")
        try:
            results.append(run_case(name, rounds=rounds))
        except Exception as e:  # noqa: BLE001 - a failed case is recorded; the next still runs
            results.append({"label": SMALL[name]["label"], "model": name, "error": f"{type(e).__name__}: {e}"})
        log(f"  -> {results[-1].get('ratio_jax_over_torch') or results[-1].get('error') or results[-1].get('skipped')}")
    return results


if __name__ == "__main__":
    import json

    from benchmarks.harness import Budget

    print(json.dumps(run_train_torch_section(Budget(1e9), names=sys.argv[1:] or ("stage_c", "stage_b")), indent=1,
                     default=str))
