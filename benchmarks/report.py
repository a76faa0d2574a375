"""``results/summary.md`` from the section JSON files, and the marked section of docs/benchmarks.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.harness import REPO_ROOT

BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(results_dir: Path, name: str):
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _f(value, digits=2, suffix=""):
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _x(value, digits=2):
    """A ratio as '1.23×', or '–'."""
    return _f(value, digits, "×")


def _load_note(record: dict) -> str:
    before, after = record.get("load_before") or {}, record.get("load_after") or {}
    others = [x.get("other_processes_cpu_pct") for x in (before, after) if x.get("other_processes_cpu_pct") is not None]
    return f"{max(others):.0f}%" if others else "–"


def forward_table(data) -> list[str]:
    lines = ["### Forward pass, float32, random weights shared by both frameworks", "",
             "Spread = (max − min) / median over the n alternating runs. 'depthwise as shifted sums': the same JAX "
             "model with its 3×3 depthwise convolutions written as 9 shifted multiply-adds (the library's CPU "
             "path since this benchmark found XLA:CPU's grouped convolution 10-18x slower; the column forces that "
             "form explicitly).", "",
             "| model | latent (NHWC) | JAX s (median, spread, n) | PyTorch s (median, spread, n) | JAX / PyTorch | "
             "depthwise as shifted sums / PyTorch | JAX GFLOP/s | JAX compile s | max rel. diff | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes, slow = [], []
    for r in data or []:
        if "jax" not in r:
            notes.append(f"- {r.get('label')} batch {r.get('batch')}: **{'skipped' if 'skipped' in r else 'error'}** — "
                         f"{r.get('skipped') or r.get('error')}")
            continue
        j, t = r["jax"], r["torch"]
        shifted = r.get("jax_depthwise_shifted_sum") or {}
        shape = "×".join(str(d) for d in r.get("latent_shape_nhwc", []))
        lines.append(f"| {r['label']} | {shape} | {_f(j['median_s'], 3)} ({_f(j['spread_pct'], 0)}%, {j['n']}) | "
                     f"{_f(t['median_s'], 3)} ({_f(t['spread_pct'], 0)}%, {t['n']}) | "
                     f"**{_x(r['ratio_jax_over_torch'])}** | {_x(shifted.get('ratio_over_torch'))} | "
                     f"{_f((r.get('gflops_per_s') or {}).get('jax'), 0)} | "
                     f"{_f(r['jax_compile_s'], 1)} | {r['max_rel_diff_vs_torch']:.1e} | {_load_note(r)} |")
        for op in (r.get("breakdown") or {}).get("slower_in_jax", [])[:4]:
            slow.append(f"- {r['label']} b{r['batch']}: {op['where']} `{op['op']}` {op['ratio']:.2f}× PyTorch "
                        f"(≈{op['lost_s_per_forward']:.2f} s lost per forward)")
    lines += [""] + notes
    if slow:
        lines += ["", "Ops where JAX is slower than PyTorch (per-op breakdown, `forward.json` → `breakdown`):"] + slow
    return lines


def pipeline_table(data) -> list[str]:
    lines = [f"### Text-to-image pipeline ({(data or {}).get('set', 'lite')} set, random weights, float32)", ""]
    if not data or "runs" not in data:
        reason = (data or {}).get("skipped") or (data or {}).get("error") or "not run"
        return lines + [f"Skipped: {reason}"]
    lines += [f"{data['size']}×{data['size']}, batch {data['batch']}, steps {data['steps']['stage_c']}+"
              f"{data['steps']['stage_b']}, CFG {data['cfg']['stage_c']} / {data['cfg']['stage_b']} "
              f"(both run the cond+uncond batch). Size: {data['size_note']}.", "",
              "| stage | compile s | steady loop s | one forward s (CFG batch) | forward × steps s | loop overhead |",
              "|---|---|---|---|---|---|"]
    for stage in ("stage_c", "stage_b"):
        o, c = data["loop_overhead"][stage], data["model_calls"][stage]
        lines.append(f"| {stage} | {_f(data['compile_s'][stage], 1)} | {_f(o['loop_s'], 2)} | {_f(c['median_s'], 3)} | "
                     f"{_f(o['model_calls_s'], 2)} | {_f(o['overhead_pct'], 1)}% |")
    steady = data["runs"][-1]
    lines += ["", f"Whole call (steady): {_f(steady['wall_s'], 1)} s ({_f(data['images_per_s_steady'], 3)} images/s); "
                  f"first call {_f(data['runs'][0]['wall_s'], 1)} s; `pipe.decode` (Stage A) alone "
                  f"{_f(data['stage_a_decode_s'], 2)} s (first call {_f(data.get('stage_a_decode_first_s'), 2)} s)."]
    return lines


def convert_table(data) -> list[str]:
    lines = ["### Checkpoint conversion (official bf16 safetensors → converted directory, bf16)", "",
             "Peak RSS is the converting process's VmHWM (interpreter and libraries included, ~0.2 GiB); 'net' "
             "subtracts the RSS before the conversion started.", "",
             "| checkpoint | output GiB | convert s | plain copy s | time / copy (goal ≤2) | peak RSS GiB | "
             "peak / output (goal ≤1.3) | net peak / output |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in data or []:
        if "convert" not in r:
            notes.append(f"- {r.get('label')}: **{'skipped' if 'skipped' in r else 'error'}** — "
                         f"{r.get('skipped') or r.get('error')}")
            continue
        lines.append(f"| {r['label']} | {_f(r['output_array_bytes'] / 2**30)} | {_f(r['convert']['seconds'], 1)} | "
                     f"{_f(r['baseline_s'], 1)} | {_x(r['time_ratio_vs_copy'])} | {_f(r['peak_rss_gb'])} | "
                     f"{_x(r['peak_over_output'])} | {_x(r.get('net_peak_over_output'))} |")
        phases = r["convert"].get("phases_gb", {})
        if phases:
            desc = "; ".join(f"{k}: RSS {v.get('VmRSS', 0):.2f} (anon {v.get('RssAnon', 0):.2f}, file "
                             f"{v.get('RssFile', 0):.2f})" for k, v in phases.items() if k not in ("start", "work"))
            notes.append(f"- {r['label']} peak GiB by phase — {desc}; phase seconds {r['convert'].get('phase_s')}")
    return lines + [""] + notes


def train_table(data, machine) -> list[str]:
    peak = (machine or {}).get("nominal_peak_fp32", {})
    probe = (machine or {}).get("matmul_probe_gflops", {})
    lines = ["### Training step (the library's `jit_train_step`, AdamW, float32, random weights)", "",
             "One update of `build_run` on a config of `configs/training/` (`bench_train.py`), each variant in its own "
             "process. 'cached': `cached_conditions` (the frozen encoders ran once, `latent_cache`); otherwise the "
             "step runs EfficientNet / CLIP (/ Stage A) too. MFU = model flops (XLA cost analysis of the lowered step "
             f"without remat, encoders included when they run) / step time / peak; nominal peak "
             f"{_f(peak.get('gflops'), 0)} GFLOP/s = {peak.get('how', '?')}; measured fp32 matmul "
             f"{_f(probe.get('jax'), 0)} GFLOP/s (JAX). Peak RSS = the process's VmHWM (build included); XLA temp = "
             "the step's scratch memory (what remat shrinks).", "",
             "| model | config | remat | cached | batch @ image | compile s | step s | steps/s | images/s | "
             "MFU (nominal) | MFU (vs matmul) | peak RSS GiB | XLA temp GiB | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in data or []:
        if "median_step_s" not in r:
            notes.append(f"- {r.get('label')} remat={r.get('remat')}{' cached' if r.get('cached') else ''}: "
                         f"**{'skipped' if 'skipped' in r else 'not measured'}** — {r.get('skipped') or r.get('error')}")
            continue
        temp = (r.get("xla_memory_gb") or {}).get("temp") if isinstance(r.get("xla_memory_gb"), dict) else None
        lines.append(f"| {r['label']} | {r.get('config')} | {r['remat']} | {'yes' if r.get('cached') else 'no'} | "
                     f"{r['batch']} @ {r.get('image_size')}² | {_f(r['compile_s'], 0)} | {_f(r['median_step_s'], 3)} | "
                     f"{_f(r.get('steps_per_s'), 2)} | {_f(r['images_per_s'], 2)} | "
                     f"{_f(100 * r.get('mfu_vs_nominal_peak', 0), 1)}% | {_f(100 * r.get('mfu_vs_measured_matmul', 0), 1)}% "
                     f"| {_f(r['peak_rss_gb'])} | {_f(temp, 2)} | {_load_note(r)} |")
        if r.get("cache_write_s"):
            notes.append(f"- {r['label']} remat={r['remat']} cached: {r.get('cache')}, {_f(r['cache_write_s'], 1)} s "
                         "for the batch (compile included)")
    return lines + [""] + notes


def train_torch_table(data) -> list[str]:
    lines = ["### One training update, JAX against PyTorch (float32, same weights and batch)", "",
             "The library's `train_step` (GDF loss, clipping, AdamW; jitted, state donated) against diffusers' "
             "`StableCascadeUNet` with the official GDF training math, `clip_grad_norm_` and `torch.optim.AdamW` "
             "(`bench_train_torch.py`), alternating in one process. Phases: the loss alone, loss and gradients "
             "minus the loss (backward), clipping and AdamW on given gradients (optimizer); medians in seconds.", "",
             "| model | params | batch, latent | JAX s (spread, n) | PyTorch s (spread, n) | JAX / PyTorch | "
             "JAX / PyTorch on 1 thread | forward JAX / PT | backward JAX / PT | optimizer JAX / PT | "
             "first loss rel. diff | JAX compile s | other load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in data or []:
        if "jax" not in r:
            notes.append(f"- {r.get('label')}: **{'skipped' if 'skipped' in r else 'error'}** — "
                         f"{r.get('skipped') or r.get('error')}")
            continue
        j, t, p = r["jax"], r["torch"], r["phases"]
        shape = "×".join(str(d) for d in r["latent_shape_nhwc"])
        pair = lambda k: f"{_f(p['jax'][k], 3)} / {_f(p['torch'][k], 3)}"  # noqa: E731
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | {shape} | {_f(j['median_s'], 3)} "
                     f"({_f(j['spread_pct'], 0)}%, {j['n']}) | {_f(t['median_s'], 3)} ({_f(t['spread_pct'], 0)}%, "
                     f"{t['n']}) | **{_x(r['ratio_jax_over_torch'])}** | "
                     f"{_x((r.get('torch_1_thread') or {}).get('ratio_jax_over_torch'))} | {pair('forward_s')} | "
                     f"{pair('backward_s')} | "
                     f"{pair('optimizer_s')} | {r['first_loss']['rel_diff']:.1e} | {_f(r['jax_compile_all_s'], 0)} | "
                     f"{_load_note(r)} |")
    return lines + [""] + notes


def machine_lines(machine) -> list[str]:
    if not machine:
        return []
    v = machine.get("versions", {})
    load = machine.get("load_at_start", {})
    return [f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gb')} GiB; "
            f"jax {v.get('jax')}, flax {v.get('flax')}, torch {v.get('torch')} ({machine.get('cores')} threads), "
            f"diffusers {v.get('diffusers')}. Run {machine.get('started')} ({machine.get('mode')} set, budget "
            f"{machine.get('budget_s'):.0f} s); at start load average {load.get('loadavg_1m')}, other processes "
            f"{load.get('other_processes_cpu_pct')}% CPU. 'other load' columns: peak CPU % of other processes around "
            "the case (100% = one core taken); PyTorch's OpenMP threads suffer most from a busy core."]


def write_summary(results_dir: Path) -> str:
    sections = {name: _load(results_dir, name)
                for name in ("machine", "forward", "pipeline", "convert", "train", "train_torch")}
    machine = sections["machine"]
    body = ["## Benchmarks (CPU)", "", *machine_lines(machine), "",
            "Generated by `make bench` (`benchmarks/run_cpu.py`); raw numbers in `benchmarks/results/*.json`.", ""]
    tables = {"forward": forward_table, "pipeline": pipeline_table, "convert": convert_table,
              "train": lambda results: train_table(results, (sections["train"] or {}).get("machine") or machine),
              "train_torch": train_torch_table}
    for name, table in tables.items():
        results = (sections[name] or {}).get("results")
        if isinstance(results, dict) and "error" in results:  # a section that failed as a whole
            body += [f"### {name}: failed", "", f"`{results['error']}`", ""]
            continue
        body += table(results) + [""]
    text = "\n".join(body)
    (results_dir / "summary.md").write_text(text)
    return text


def update_benchmarks_page(summary: str, page: Path = REPO_ROOT / "docs" / "benchmarks.md") -> bool:
    """Replace the text between the bench markers of docs/benchmarks.md; False (and no change) without markers."""
    if not page.is_file():
        return False
    text = page.read_text()
    pattern = re.compile(re.escape(BENCH_START) + ".*?" + re.escape(BENCH_END), re.DOTALL)
    if not pattern.search(text):
        print(f"{page} has no {BENCH_START} ... {BENCH_END} markers; summary left in benchmarks/results/summary.md")
        return False
    page.write_text(pattern.sub(lambda _: f"{BENCH_START}\n{summary}\n{BENCH_END}", text))
    return True
