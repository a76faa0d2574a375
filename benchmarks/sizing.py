"""The README's "Sizing a TPU run" table: the released training configs planned for TPU slices (libtpu, no TPU).

Each cell compiles the real step (``cascade_jax.training.plan``) for full FSDP over the slice (parameters and
AdamW moments sharded over every chip, remat full), finds the largest batch per chip that fits with a 10%
margin (two compiles give the memory slope, a third confirms; ``plan_fit.largest_batch``) and plans that
batch: per-chip peak against the HBM, the compiler's step-time estimate (for a scanned step:
``plan_estimate``'s two shallow compiles) and the MFU it implies. Plus the whole sampling cascade (1024², 4
images, bf16) on one v5e and one v6e chip. Every compile runs in its own process under a host-memory watchdog
(``bounded.py``) and a time limit; a cell that is not run says why. All times are compiler estimates, not
measurements.

    python benchmarks/sizing.py                               # every cell: hours on a 2-core machine
    python benchmarks/sizing.py --only "Stage C 3.6B full" --slices v5p-16
    python benchmarks/sizing.py --tiny                        # smoke test: tiny configs on a v5e-4
    python benchmarks/sizing.py --only "Stage B 700M" --slices v6e-8 --out /tmp/b.json --no-readme &  # in parallel
    python benchmarks/sizing.py --merge /tmp/b.json           # its cells into results/sizing.json and the README
Writes results/sizing.json and results/sizing.md, and the README section between its markers, after every cell;
cells of earlier runs in that file are kept (a cell planned again is replaced), and every cell of the grid without
a result is a row that says it was not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bounded import run_bounded  # noqa: E402

# (label, config, overrides, slices): the released configs at their official image sizes; slices None: every
# slice of SLICES. The frozen encoders run ahead of the step (cached_conditions) where the task can (the LoRA's
# new tokens train text-encoder rows; ControlNet and LCM encode in the step): that is how
# a pod run trains (the latent cache), and with CLIP bigG and EfficientNet in the step the shallow compiles of
# the time estimate pass the 8 GiB host limit (docs/planning.md). The LCM rows (issue 35) plan the slice of the
# issue's goal only.
CACHED = ["cached_conditions=true"]
TRAINING = [("Stage C 3.6B full finetune", "finetune_c_3b", CACHED, None),
            ("Stage C 3.6B LoRA", "finetune_c_3b_lora", [], None),  # its train_tokens need the text encoder
            ("ControlNet (canny) on Stage C 3.6B", "controlnet_c_3b_canny", [], None),
            ("Stage B 1.5B", "finetune_b_3b", CACHED, None),
            ("Stage B 700M", "finetune_b_700m", CACHED, None),
            ("Stage C 3.6B LCM distillation", "lcm_c_3b", [], ["v5p-16"]),
            ("Stage C 3.6B LCM-LoRA", "lcm_c_3b_lora", [], ["v5p-16"])]
SLICES = ["v4-8", "v5e-16", "v5p-16", "v5p-128", "v6e-8", "v6e-256"]
SAMPLING = [("cascade 1024², 4 images, bf16", "full", 1024, 4, slice_) for slice_ in ("v5e-1", "v6e-1")]
TINY_TRAINING = [("tiny Stage C", "tiny_c", ["cached_conditions=true", "scan_blocks=true"], None)]
TINY_SLICES = ["v5e-4"]
TINY_SAMPLING = [("tiny cascade 128²", "tiny", 128, 2, "v5e-1")]
MARKERS = ("<!-- sizing:start -->", "<!-- sizing:end -->")
# A scanned step's time estimate (plan_estimate): the step's FLOPs, then the shallow copies at 1x and 2x depth
# (``point1`` / ``point2``: their index here is their scale)
ESTIMATE_PARTS = ("flops", "point1", "point2")


class CompileFailed(Exception):
    """A compile of the batch search ended without a memory report (crash, watchdog, error)."""


class ChildSearch:
    """``plan_fit.largest_batch``'s search with every compile in its own process under the watchdog (a process
    keeps the host memory of its compiles: two 3.6B compiles in one went past 8 GiB)."""

    def __init__(self, config: str, overrides: list, target, limit_gib: float, timeout_s: float, folder: Path):
        self.config, self.overrides, self.target, self.margin, self.tried = config, overrides, target, 0.10, []
        self.limits, self.folder = (limit_gib, timeout_s), folder

    def compile(self, per_chip: int, remat, data: int, fsdp: int) -> dict:
        candidate = {"batch_per_chip": per_chip, "remat": remat or "none", "mesh": {"data": data, "fsdp": fsdp}}
        report = self.child("plan", per_chip, remat, data, fsdp)
        candidate.update({k: report.get(k) for k in ("fits", "peak_gib_per_device", "error", "compile_s",
                                                     "child_peak_rss_gib", "child_cpu_s")})
        self.tried.append(candidate)
        print(f"sizing:   {candidate}", file=sys.stderr, flush=True)
        if candidate["error"] is not None:
            # a compile that crashed or was stopped says nothing about fitting: the cell reports it instead of
            # taking it for "does not fit" (which would publish a smaller largest batch than the truth)
            raise CompileFailed(f"the compile at {per_chip} image(s) per chip failed: {candidate['error']}")
        return {**candidate, "report": report}

    def fits(self, candidate: dict) -> bool:
        return candidate.get("fits") is not False

    def child(self, kind: str, per_chip: int, remat, data: int, fsdp: int) -> dict:
        overrides = [*self.overrides, f"batch_size={per_chip * data * fsdp}", "grad_accum_steps=1",
                     f"remat={remat or 'null'}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"]
        return run_child(kind, [self.config, overrides, self.target.name], *self.limits, self.folder)


def training_cell(config: str, overrides: list, slice_name: str, limit_gib: float, timeout_s: float,
                  folder: Path) -> dict:
    """The largest batch per chip at full FSDP and remat full, then that batch's plan and step-time estimate
    (``plan_estimate``'s two shallow compiles and the step's FLOPs, each in a process of its own)."""
    from cascade_jax.accelerators import plan_target
    from cascade_jax.training.plan_estimate import extrapolate
    from cascade_jax.training.plan_fit import largest_batch

    target = plan_target(slice_name)
    search = ChildSearch(config, overrides, target, limit_gib, timeout_s, folder)
    try:
        best = largest_batch(search, "full", 1, target.device_count)
    except CompileFailed as e:
        return {"tried": search.tried, "error": str(e)}
    if best is None:
        return {"tried": search.tried, "fits": False, "batch_per_chip": 0, "error": "one image per chip does not fit"}
    args = (best["batch_per_chip"], "full", 1, target.device_count)
    report, estimate = best["report"], {}
    for kind in ESTIMATE_PARTS:  # each in its own process; the first that fails ends the estimate
        estimate[kind] = search.child(kind, *args)
        if "error" in estimate[kind]:
            break
    seconds = report.get("estimated_step_s")
    if seconds is None and len(estimate) == len(ESTIMATE_PARTS) and not any("error" in e for e in estimate.values()):
        seconds = extrapolate([(estimate[k]["optimal_seconds"], estimate[k]["flops"]) for k in ("point1", "point2")],
                              estimate["flops"]["hardware_flops"])
    model_flops = estimate["flops"].get("model_flops", 0) / target.device_count
    return {**report, "tried": search.tried, "batch_per_chip": best["batch_per_chip"], "estimated_step_s": seconds,
            "flops_per_step_per_device": model_flops or report.get("flops_per_step_per_device"),
            "estimated_mfu": model_flops / (seconds * target.peak_flops) if seconds and model_flops else None,
            "estimate": estimate}


def child_plan(kind: str, config: str, overrides: list, slice_name: str) -> dict:
    """``plan``: the step's compile; ``flops``: the step's FLOPs (traced with and without remat); ``point1`` /
    ``point2``: one of plan_estimate's two shallow compiles. One per process: a process keeps the host memory of
    what it traced and compiled, and the three together passed 10 GiB at 10-11 images per chip of a 3.6B step."""
    import cascade_jax.training.controlnet  # noqa: F401  (registers the c_controlnet task)
    import cascade_jax.training.lcm  # noqa: F401  (registers the c_lcm task)
    import cascade_jax.training.lora  # noqa: F401  (registers the c_lora task)
    from cascade_jax import compile_report
    from cascade_jax.accelerators import plan_target
    from cascade_jax.training import load_config
    from cascade_jax.training.plan import estimate_point, model_step_flops, plan, plan_mesh, traced_step

    target, cfg = plan_target(slice_name), load_config(config, overrides)
    if kind == "plan":
        return plan(cfg, target, with_model_flops=False)
    mesh = plan_mesh(cfg, target)
    if kind == "flops":
        step, _ = traced_step(cfg, mesh)
        result = {"hardware_flops": compile_report.jaxpr_flops(step.jaxpr),
                  "model_flops": model_step_flops(cfg, target, None, mesh)}
    else:
        result = estimate_point(cfg, target, None, mesh, ESTIMATE_PARTS.index(kind))
    return {**result, "host_peak_rss_gib": compile_report.host_peak_rss_gib()}


def sampling_cell(set_name: str, size: int, batch: int, slice_name: str) -> dict:
    from cascade_jax.accelerators import plan_target
    from cascade_jax.pipelines import DECODER_DEFAULTS, PRIOR_DEFAULTS
    from cascade_jax.pipelines.loading import pipeline_set
    from cascade_jax.pipelines.plan import plan_sampling

    dtype = "float32" if set_name == "tiny" else "bfloat16"
    return plan_sampling(pipeline_set(set_name), plan_target(slice_name), height=size, width=size, batch=batch,
                         dtype=dtype, prior=PRIOR_DEFAULTS, decoder=DECODER_DEFAULTS)


def run_child(kind: str, args: list, limit_gib: float, timeout_s: float, folder: Path) -> dict:
    """``kind`` (a training compile, ``sampling``) in a child process under the watchdog; its JSON, or why
    there is none."""
    out = folder / f".sizing_child_{os.getpid()}.json"
    command = [sys.executable, __file__, "--child", kind, str(out), json.dumps(args)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # stderr to a file, not a pipe nobody reads while the child runs (a full pipe would block the compile)
    with open(out.with_suffix(".err"), "w+") as err:
        result = run_bounded(command, limit_gib, timeout_s=timeout_s, env=env, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        last = [line.strip() for line in err.read().splitlines() if line.strip()][-1:]
    out.with_suffix(".err").unlink()
    cell = {"child_wall_s": result["wall_s"], "child_cpu_s": result["cpu_s"],
            "child_peak_rss_gib": result["peak_rss_gib"]}
    if result["killed"]:
        return {**cell, "error": f"stopped: {result['killed']} limit ({limit_gib} GiB, {timeout_s:.0f} s)"}
    if result["rc"] != 0 or not out.is_file():
        return {**cell, "error": f"exit {result['rc']}" + (f": {last[0][:300]}" if last else "")}
    data = json.loads(out.read_text())
    out.unlink()
    return {**cell, **data}


def markdown(report: dict, training_grid=(), sampling_grid=(), *, planned_only: bool = False) -> str:
    """The table; every (label, slice) of the grids that has no result yet is a row saying it was not run, or
    (``planned_only``: the README's copy) is counted in one line that points to the full table."""
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    training, sampling = in_grid_order(report["training"], training_grid), in_grid_order(report["sampling"], sampling_grid)
    if planned_only:
        missing = sum("error" in c for c in (*training, *sampling))
        training, sampling = [c for c in training if "error" not in c], [c for c in sampling if "error" not in c]
        if not training and not sampling:
            return (f"No cell has been planned yet ({missing} in the grid): `python benchmarks/sizing.py` plans them, "
                    "one compile at a time; `benchmarks/results/sizing.md` lists each with why it was not run.\n")
    lines = [f"Each cell compiled (its date in sizing.json) with jax {report['jax']} and libtpu {report['libtpu']} on a CPU "
             "(no TPU): "
             "full FSDP over the slice, remat full, AdamW state float32, bf16 compute, the config's image size, the "
             "frozen encoders run ahead (cached_conditions) where the task allows it (not LoRA with new tokens, "
             "ControlNet, LCM); "
             "the largest batch per chip that fits with a 10% HBM margin as a line through the peaks at 1 and 2 images "
             "per chip predicts it, compiled to confirm (the peak grows slower than that line, so a somewhat larger "
             "batch may fit too: a lower bound); step time and MFU are the TPU compiler's estimates, not "
             "measurements.", "",
             "| run | slice | fits | peak / HBM per chip (GiB) | largest batch per chip | est. step s | est. MFU |",
             "|---|---|---|---|---|---|---|"]
    for c in training:
        if "error" in c:
            lines.append(f"| {c['label']} | {c['slice']} | {not_run(c['error'])} | | | | |")
            continue
        lines.append(f"| {c['label']} | {c['slice']} | {'yes' if c.get('fits') else 'no'} | "
                     f"{num(c.get('peak_gib_per_device'), '.1f')} / {num(c.get('hbm_gib_per_device'), 'g')} | "
                     f"{c.get('batch_per_chip', 0)} | {num(c.get('estimated_step_s'), '.3g')} | "
                     f"{num(c.get('estimated_mfu'), '.0%')} |")
    if sampling:  # (the README's copy has no sampling rows until one is planned)
        lines += ["", "| sampling | chip | fits | peak / HBM (GiB) | est. s per image |", "|---|---|---|---|---|"]
    for c in sampling:
        if "error" in c:
            lines.append(f"| {c['label']} | {c['slice']} | {not_run(c['error'])} | | |")
            continue
        lines.append(f"| {c['label']} | {c['slice']} | {c['verdict']} | "
                     f"{c['cascade_peak_gib_per_device']:.1f} / {num(c['hbm_gib_per_device'], 'g')} | "
                     f"{num(c['estimated_s_per_image'], '.3g')} |")
    if planned_only and missing:
        lines += ["", f"{missing} more cells are not planned yet: `benchmarks/results/sizing.md` lists them."]
    return "\n".join(lines) + "\n"


def in_grid_order(cells: list, grid) -> list:
    """The cells in the grid's order, a "not run" row for each grid entry without one, then any others."""
    by_key = {(c["label"], c["slice"]): c for c in cells}
    rows = [by_key.pop(key, {"label": key[0], "slice": key[1], "error": "not run: not yet planned on this machine"})
            for key in grid]
    return rows + list(by_key.values())


def not_run(error: str) -> str:
    return error if error.startswith("not run") else f"not run: {error}"


def merge_cell(report: dict, section: str, cell: dict):
    """``cell`` into ``report[section]`` in place of an earlier result for the same (label, slice)."""
    report[section] = [c for c in report[section] if (c["label"], c["slice"]) != (cell["label"], cell["slice"])]
    report[section].append(cell)


def earlier_report(out: Path) -> dict:
    """The results already in ``out`` (cells of earlier runs are kept, a cell planned again is replaced)."""
    if out.is_file():
        data = json.loads(out.read_text())
        return {**data, "training": data.get("training", []), "sampling": data.get("sampling", [])}
    return {"training": [], "sampling": []}


def merge_sources(path: Path) -> list:
    """(section, cell) of every cell in the sizing.json ``path``; a file that is not one fails naming it."""
    try:
        data = json.loads(path.read_text())
        cells = [(section, cell) for section in ("training", "sampling") for cell in data.get(section, [])]
        if not all(isinstance(c, dict) and "label" in c and "slice" in c for _, c in cells):
            raise ValueError("a cell without label or slice")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"sizing.py --merge {path}: not a sizing.json of this script ({e})") from None
    return cells


def write_results(report: dict, out: Path, grids: tuple, readme: bool) -> str:
    """sizing.json, sizing.md and the README section, rewritten after every cell (a long run keeps what landed)."""
    out.write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report, *grids)
    out.with_suffix(".md").write_text(table)
    if readme:
        update_readme(markdown(report, *grids, planned_only=True))
    return table


def update_readme(table: str, readme: Path = REPO / "README.md"):
    text = readme.read_text()
    start, end = MARKERS
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="tiny configs on a v5e-4 (smoke test)")
    p.add_argument("--only", default=None, help="run the cells whose label contains this text")
    p.add_argument("--slices", nargs="*", default=None, help="these slices only")
    p.add_argument("--limit-gib", type=float, default=8.0, help="host memory a cell may take")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="seconds a cell may take")
    p.add_argument("--out", default=str(BENCH_DIR / "results" / "sizing.json"))
    p.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="only merge the cells of these sizing.json files (runs of other processes or machines, "
                        "each with its own --out) into --out, then rewrite the tables; plans nothing")
    args = p.parse_args(argv)
    if args.child:
        kind, out, cell_args = args.child
        cell = sampling_cell(*json.loads(cell_args)) if kind == "sampling" else child_plan(kind, *json.loads(cell_args))
        Path(out).write_text(json.dumps(cell, default=str))
        return 0
    training, slices, sampling = (TINY_TRAINING, TINY_SLICES, TINY_SAMPLING) if args.tiny else (
        TRAINING, SLICES, SAMPLING)
    slices = args.slices or slices
    wanted = lambda label: args.only is None or args.only in label  # noqa: E731
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import jax
    from importlib import metadata
    report = {**earlier_report(out), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "libtpu": metadata.version("libtpu")}
    all_slices = TINY_SLICES if args.tiny else SLICES
    grids = ([(label, s) for label, _, _, row_slices in training for s in row_slices or all_slices],
             [(c[0], c[-1]) for c in sampling])
    readme = not args.tiny and not args.no_readme
    for other in args.merge or []:
        for section, cell in merge_sources(other):
            merge_cell(report, section, cell)
    table = write_results(report, out, grids, readme)
    if args.merge:
        print(table)
        return 0
    for label, config, overrides, row_slices in training:
        for slice_ in [s for s in slices if s in (row_slices or all_slices)] if wanted(label) else []:
            print(f"sizing: {label} on {slice_}", file=sys.stderr, flush=True)
            cell = training_cell(config, overrides, slice_, args.limit_gib, args.timeout_s, out.parent)
            merge_cell(report, "training", {"label": label, "config": config, "slice": slice_,
                                              "date": time.strftime("%Y-%m-%d"), **cell})
            table = write_results(report, out, grids, readme)
    for label, set_name, size, batch, slice_ in sampling:
        if wanted(label) and (args.slices is None or slice_ in args.slices):
            print(f"sizing: {label} on {slice_}", file=sys.stderr, flush=True)
            cell = run_child("sampling", [set_name, size, batch, slice_], args.limit_gib, args.timeout_s, out.parent)
            merge_cell(report, "sampling", {"label": label, "slice": slice_, "date": time.strftime("%Y-%m-%d"),
                                              **cell})
            table = write_results(report, out, grids, readme)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
