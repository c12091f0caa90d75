"""Ratios against diffusers, the issue's targets, and the Markdown report."""
from __future__ import annotations

BASELINE = "diffusers"
METRICS = {  # key in a worker result -> (column title, format)
    "cold_start_s": ("cold start (s)", "{:.2f}"),
    "warm_median_s": ("warm s/image", "{:.3f}"),
    "peak_rss_mib": ("peak RSS (MiB)", "{:.0f}"),
}
# The targets for sdfc, as the largest allowed ratio to diffusers.
TARGETS = {
    "cold_start_s": {"tiny": 0.2, "mid": 0.2},
    "warm_median_s": {"tiny": 0.8, "mid": 1.0},
    "peak_rss_mib": {"tiny": 0.4, "mid": 0.4},
}


def ratio(value, base) -> float | None:
    if value is None or not base:
        return None
    return round(value / base, 3)


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """{impl: {metric: value / diffusers' value}} for one model's results."""
    base = results.get(BASELINE, {})
    return {impl: {m: ratio(r.get(m), base.get(m)) for m in METRICS} for impl, r in results.items()}


# The lowest ratio sdfc could reach in this run if everything but its unavoidable part cost nothing:
# a cold start with a free start-up still computes the first image; a peak RSS with free activations
# still holds the process and its loaded weights. A target under its floor cannot be met by start-up or
# memory work, only by faster compute or fewer resident weights.
FLOORS = {"cold_start_s": ("first_image_s", "cold_start_s"),
          "peak_rss_mib": ("peak_rss_at_ready_mib", "peak_rss_mib")}


def floors(results: dict[str, dict]) -> dict[str, float | None]:
    """{metric: sdfc's unavoidable part ÷ diffusers' whole} for one model's results."""
    sdfc, base = results.get("sdfc", {}), results.get(BASELINE, {})
    return {metric: ratio(sdfc.get(part), base.get(whole)) for metric, (part, whole) in FLOORS.items()}


def verdicts(model: str, sdfc_ratios: dict[str, float | None],
             floor: dict[str, float | None] | None = None) -> dict[str, dict]:
    out = {}
    for metric, limits in TARGETS.items():
        limit, value = limits.get(model), sdfc_ratios.get(metric)
        verdict = None if limit is None or value is None else ("PASS" if value <= limit else "MISS")
        out[metric] = {"ratio": value, "limit": limit, "verdict": verdict, "floor": (floor or {}).get(metric)}
    return out


# --- Markdown ------------------------------------------------------------------------------------

def _fmt(value, pattern: str = "{}") -> str:
    return "–" if value is None else pattern.format(value)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def machine_lines(machine: dict, results: list[dict]) -> list[str]:
    packages = machine["packages"]
    versions = ", ".join(f"{k} {packages[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch", "diffusers",
                                                         "optimum-onnx") if k in packages)
    providers = sorted({f"{r['impl']}: {', '.join(r['providers'])}" for r in results if r.get("providers")})
    threads = list({r["impl"]: _threads(r) for r in results if "error" not in r}.values())
    gpus = f"; GPU {', '.join(machine['gpus'])}" if machine["gpus"] else ""
    return [
        f"- Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs "
        f"({machine['physical_cores']} physical cores), {machine['memory_gib']} GiB RAM{gpus}; "
        f"{machine['os']}, Python {machine['python']}",
        f"- Versions: {versions}",
        f"- ONNX Runtime execution provider actually used: {'; '.join(providers) or '–'}",
        f"- Threads (defaults, recorded): {'; '.join(threads)}",
    ]


def _threads(r: dict) -> str:
    parts = []
    if "ort_session" in r:
        o = r["ort_session"]
        parts.append(f"ORT intra {o['intra_op_num_threads']} / inter {o['inter_op_num_threads']} (0 = default)")
    if "torch" in r:
        parts.append(f"torch {r['torch']['num_threads']} / interop {r['torch']['num_interop_threads']}")
    return f"{r['impl']}: {', '.join(parts) or '–'}, {r.get('os_threads', '?')} OS threads after the run"


def model_table(model: dict, results: dict[str, dict], rel: dict[str, dict]) -> list[str]:
    params = model.get("unet_parameters")
    head = f"### {model['size']}: {model['image']}" + (f", UNet {params / 1e6:.2f} M parameters" if params else "")
    lines = [head, ""]
    titles = []
    for title, _ in METRICS.values():
        titles += [title, "× diffusers"]
    lines.append(_row(["impl", *titles, "other CPU load (cores)"]))
    lines.append(_row(["---"] * (2 + 2 * len(METRICS))))
    for impl, r in results.items():
        if "error" in r:
            lines.append(_row([impl, f"error: {r['error']}", *[""] * (2 * len(METRICS))]))
            continue
        cells = []
        for metric, (_, pattern) in METRICS.items():
            cells += [_fmt(r.get(metric), pattern), _fmt(rel[impl].get(metric), "{:.2f}×")]
        lines.append(_row([impl, *cells, _fmt(r.get("other_cpu_load"), "{:.2f}")]))
    return lines + [""]


def targets_table(per_model: dict[str, dict]) -> list[str]:
    titles = ["cold start", "warm latency", "peak RSS"]
    lines = ["### Targets: sdfc ÷ diffusers", "", _row(["model", *titles]), _row(["---"] * 4)]
    for size, v in per_model.items():
        cells = [f"{_fmt(x['ratio'], '{:.2f}×')} ≤ {x['limit']}× {x['verdict'] or '–'}"
                 + (f" (floor {x['floor']:.2f}×)" if x.get("floor") is not None else "") for x in v.values()]
        lines.append(_row([size, *cells]))
    return lines + ["", "Floor: sdfc's ratio if its start-up (cold start) or its activations (peak RSS) cost "
                    "nothing: the first image's compute alone, or the process with its weights loaded, "
                    "divided by diffusers' whole figure. A target below its floor needs faster compute or "
                    "fewer resident weights, not start-up or memory work.", ""]


BREAKDOWN = ("imports_s", "load_s", "start_to_ready_s", "first_image_s", "start_to_first_image_s", "cold_start_s",
             "cpu_s")


def breakdown_table(results_by_model: dict[str, dict[str, dict]]) -> list[str]:
    """Where a cold start goes, as the worker saw it from inside."""
    lines = ["### Cold start, inside the worker (s)", "",
             _row(["model", "impl", "imports", "load", "spawn → ready", "first image", "spawn → image (inside)",
                   "spawn → image (outside)", "CPU s (whole process)"]),
             _row(["---"] * 9)]
    for size, results in results_by_model.items():
        for impl, r in results.items():
            if "error" in r:
                continue
            lines.append(_row([size, impl, *(_fmt(r.get(k), "{:.2f}") for k in BREAKDOWN)]))
    return lines + [""]


def markdown(report: dict) -> str:
    s = report["settings"]
    all_results = [r for by_impl in report["results"].values() for r in by_impl.values()]
    lines = [f"## sdfc bench, {report['started']}", ""]
    lines += machine_lines(report["machine"], all_results)
    lines += [f"- Settings: device {s['device']}, {s['steps']} steps, Euler, CFG {s['cfg_scale']}, seed 1, "
              f"warm latency = median of {s['runs']} images after the first; cold start = new process, "
              f"interpreter start → first PNG on disk (OS page cache warm); peak RSS = the worker's VmHWM; "
              f"workers at niceness {s['nice']:+d}",
              f"- Whole run: {report['total_s']:.0f} s", ""]
    for size, results in report["results"].items():
        lines += model_table(report["models"][size], results, report["ratios"][size])
    lines += targets_table(report["targets"])
    lines += breakdown_table(report["results"])
    busy = [r for r in all_results if (r.get("other_cpu_load") or 0) > 0.2]
    if busy:
        lines += [f"Warning: other processes used CPU during {len(busy)} worker run(s) (last column above); "
                  "their timings are inflated.", ""]
    return "\n".join(lines)
