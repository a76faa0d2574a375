"""``--plan TOPOLOGY --fit``: the largest batch per chip, the cheapest remat policy and the mesh split that
fit a slice with a margin, found by compiling the real step (``training/plan.py``) for a few candidates.

The search, in compiles:

1. meshes: the train state must fit before any batch does. Data parallelism alone (the state replicated)
   is the cheapest in communication, then FSDP over 2, 4 ... every device (state sharded). A mesh is kept
   when its step at one image per chip with full remat fits; the first such one and full FSDP (the most
   room for activations) are searched, since more sharding trades communication for batch.
2. per mesh and remat policy (cheapest first: none, ``dots_saveable``, ``dots_with_no_batch_dims_saveable``,
   full): peak memory is close to linear in the batch per chip, so two compiles (1 and 2 images) predict the
   largest batch that fits; it is compiled to confirm (and lowered until it fits).
3. the winner: the most images per second by the compiler's estimate (on CPU targets, which have none: the
   largest batch, then the cheaper remat and mesh).

Every compile is listed under ``tried``. The configured ``batch_size`` is the request: the report says
whether it fits as asked and, when not, what would.
"""

from __future__ import annotations

import dataclasses
import sys

from cascade_jax.accelerators import Target
from cascade_jax.training.config import MeshConfig, TrainConfig
from cascade_jax.training.plan import DEFAULT_MARGIN, plan

REMAT_ORDER = (None, "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
MAX_BATCH_PER_CHIP = 256  # a search bound; the report says when a candidate reached it


def variant(cfg: TrainConfig, per_chip: int, remat, data: int, fsdp: int, tensor: int = 1) -> TrainConfig:
    """``cfg`` at ``per_chip`` images per batch-parallel device, one micro-batch (a loop hides XLA's estimate)."""
    return dataclasses.replace(cfg, batch_size=per_chip * data * fsdp, grad_accum_steps=1, remat=remat,
                               mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


class Search:
    """Compiles candidates for one target, remembering each result."""

    def __init__(self, cfg: TrainConfig, target: Target | None, margin: float, isolate: bool = False,
                 child_memory_gib: float | None = None):
        self.cfg, self.target, self.margin, self.tried = cfg, target, margin, []
        self.isolation = {"isolate": isolate, "child_memory_gib": child_memory_gib}

    def compile(self, per_chip: int, remat, data: int, fsdp: int) -> dict:
        candidate = {"batch_per_chip": per_chip, "remat": remat or "none", "mesh": {"data": data, "fsdp": fsdp}}
        known = next((c for c in self.tried if all(c[k] == candidate[k] for k in candidate)), None)
        if known is not None:
            return known
        try:
            report = plan(variant(self.cfg, per_chip, remat, data, fsdp), self.target, margin=self.margin,
                          with_model_flops=False, **self.isolation)
        except Exception as e:  # noqa: BLE001 - a candidate the compiler refuses is recorded, not fatal
            candidate.update(fits=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            self.tried.append(candidate)
            return candidate
        candidate.update({k: report.get(k) for k in ("fits", "peak_gib_per_device", "estimated_step_s",
                                                      "images_per_s_estimate", "compile_s")})
        self.tried.append(candidate)
        print(f"--fit: {describe(candidate)}", file=sys.stderr, flush=True)
        return candidate

    def fits(self, candidate: dict) -> bool:
        # No capacity known (CPU): every compiled candidate counts as fitting.
        return candidate.get("error") is None and candidate.get("fits") is not False


def mesh_splits(devices: int) -> list[tuple[int, int]]:
    """(data, fsdp) from all-data to all-FSDP over powers of two."""
    splits, fsdp = [], 1
    while fsdp <= devices:
        if devices % fsdp == 0:
            splits.append((devices // fsdp, fsdp))
        fsdp *= 2
    if splits[-1][1] != devices:
        splits.append((1, devices))
    return splits


def largest_batch(search: Search, remat, data: int, fsdp: int) -> dict | None:
    """The largest fitting batch per chip for one mesh and remat policy (None if one image does not fit)."""
    one = search.compile(1, remat, data, fsdp)
    if not search.fits(one):
        return None
    if search.target is None or search.target.hbm_gib is None:
        return one  # no capacity to fill: the smallest step
    two = search.compile(2, remat, data, fsdp)
    if not search.fits(two):
        return one
    per_image = two["peak_gib_per_device"] - one["peak_gib_per_device"]
    usable = search.target.hbm_gib * (1 - search.margin)
    guess = MAX_BATCH_PER_CHIP if per_image <= 0 else int((usable - one["peak_gib_per_device"]) / per_image) + 1
    best, guess = two, min(max(guess, 2), MAX_BATCH_PER_CHIP)
    while guess > best["batch_per_chip"]:
        candidate = search.compile(guess, remat, data, fsdp)
        if search.fits(candidate):
            return candidate
        guess = max(best["batch_per_chip"], int(guess * 0.85))
    return best


def feasible_meshes(search: Search, devices: int, tensor_note: list) -> list[tuple[int, int]]:
    """The first (least sharded) mesh whose state fits at one image with full remat, and full FSDP."""
    splits = mesh_splits(devices)
    for data, fsdp in splits:
        if search.fits(search.compile(1, "full", data, fsdp)):
            return sorted({(data, fsdp), splits[-1]}, key=lambda s: s[1])
    tensor_note.append("the train state does not fit even with FSDP over every device and full remat: more "
                       "chips (a larger slice), moment_dtype=bfloat16, or a smaller model")
    return []


def rank(candidate: dict) -> tuple:
    """Sort key of fitting candidates: most images/s (estimate), then largest batch, then cheapest remat/mesh."""
    ips = candidate.get("images_per_s_estimate") or 0.0
    return (-ips, -candidate["batch_per_chip"], REMAT_ORDER.index(None if candidate["remat"] == "none"
                                                                 else candidate["remat"]), candidate["mesh"]["fsdp"])


def fit(cfg: TrainConfig, target: Target | None, *, margin: float = DEFAULT_MARGIN, remats=REMAT_ORDER,
        isolate: bool = False, child_memory_gib: float | None = None) -> dict:
    """Search (see the module docstring); returns the winner's full plan, the request's verdict and ``tried``.
    ``isolate``, ``child_memory_gib``: every compile in a fresh process (see ``plan``), as ``--fit`` runs it."""
    from cascade_jax.sharding import make_mesh

    devices = len(target.devices) if target is not None else make_mesh(-1).devices.size
    search, notes = Search(cfg, target, margin, isolate, child_memory_gib), []
    best = []
    for data, fsdp in feasible_meshes(search, devices, notes):
        for remat in remats:
            found = largest_batch(search, remat, data, fsdp)
            if found is not None:
                best.append(found)
    report = {"target": target.name if target is not None else "current devices", "margin": margin,
              "request": request_verdict(cfg, devices, best), "notes": notes, "compiles": len(search.tried)}
    if best:
        winner = sorted(best, key=rank)[0]
        report["winner"] = {k: winner[k] for k in ("batch_per_chip", "remat", "mesh")}
        report["winner"]["overrides"] = winner_overrides(winner)
        report["plan"] = plan(variant(cfg, winner["batch_per_chip"], None if winner["remat"] == "none"
                                      else winner["remat"], **winner["mesh"]), target, margin=margin)
    report["fits"] = bool(best) if target is not None and target.hbm_gib is not None else None
    report["tried"] = search.tried
    return report


def request_verdict(cfg: TrainConfig, devices: int, best: list) -> dict:
    """Does the configured batch (global, as in the config) fit at some searched remat and mesh?"""
    batch_parallel = lambda c: c["mesh"]["data"] * c["mesh"]["fsdp"]
    ok = [c for c in best if cfg.batch_size % batch_parallel(c) == 0
          and cfg.batch_size // batch_parallel(c) <= c["batch_per_chip"]]
    verdict = {"batch_size": cfg.batch_size, "fits": bool(ok)}
    if ok:
        cheapest = sorted(ok, key=lambda c: (REMAT_ORDER.index(None if c["remat"] == "none" else c["remat"]),
                                             c["mesh"]["fsdp"]))[0]
        verdict["with"] = {"remat": cheapest["remat"], "mesh": cheapest["mesh"]}
    elif best:
        largest = max(best, key=lambda c: c["batch_per_chip"] * batch_parallel(c))
        verdict["largest_that_fits"] = largest["batch_per_chip"] * batch_parallel(largest)
    return verdict


def winner_overrides(candidate: dict) -> str:
    mesh = candidate["mesh"]
    return (f"batch_size={candidate['batch_per_chip'] * mesh['data'] * mesh['fsdp']} remat={candidate['remat']} "
            f"mesh.data={mesh['data']} mesh.fsdp={mesh['fsdp']} mesh.tensor=1 grad_accum_steps=1").replace(
        "remat=none", "remat=null")


def describe(c: dict) -> str:
    status = c.get("error") or ("fits" if c.get("fits") else "does not fit" if c.get("fits") is False else "compiled")
    peak = "-" if c.get("peak_gib_per_device") is None else f"{c['peak_gib_per_device']:.2f} GiB"
    ips = "-" if c.get("images_per_s_estimate") is None else f"{c['images_per_s_estimate']:.3g} img/s"
    return (f"batch/chip {c['batch_per_chip']:>4}  remat {c['remat']:<32}  data={c['mesh']['data']} "
            f"fsdp={c['mesh']['fsdp']}  peak {peak:>10}  {ips:>12}  {status}")


def format_fit(report: dict) -> str:
    lines = [f"tried on {report['target']} (margin {report['margin']:.0%}), {report['compiles']} compiles:"]
    lines.extend(f"  {describe(c)}" for c in report["tried"])
    request = report["request"]
    if request["fits"]:
        lines.append(f"requested batch_size={request['batch_size']} fits with remat={request['with']['remat']}, "
                     f"mesh {request['with']['mesh']}")
    else:
        hint = f"; the largest that fits: batch_size={request['largest_that_fits']}" if "largest_that_fits" in request \
            else ""
        lines.append(f"requested batch_size={request['batch_size']} does not fit{hint}")
    if "winner" in report:
        lines.append(f"winner (most images/s by the compiler's estimate): {report['winner']['overrides']}")
    lines.extend(report["notes"])
    return "\n".join(lines)
