"""The benchmark's outputs: machine description, ratios, markdown table, plot of time against layers."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .measure import paired_ratio, stats

BASELINE = "monolithic"


def machine(threads: int) -> dict:
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


#: decode-time targets (issue 11): contender ÷ reference at most this
TARGETS = {("chain_full", "genai_fp32"): 1.05, ("chain_int4", "genai_int4"): 1.10, ("chain_int4", "llamacpp"): 1.10,
           ("chain_int4-refine", "genai_int4"): 1.10, ("chain_int4-refine", "llamacpp"): 1.10}
#: ratios reported without a target: what the chain's calls add to the same kernels
OVERHEADS = (("chain_int4", "monolithic_int4"), ("chain_full", "monolithic"), ("chain_full", "span_fp32"),
             ("chain_int4", "span_int4"))
#: a forced exit after k of L blocks may cost at most k/L of full depth plus this
FORCED_EXIT_SLACK = 0.05
#: references every contender's decode time is divided by, when present
REFERENCES = ("monolithic", "genai_fp32", "genai_int4", "llamacpp", "chain_full")


def _reference(samples: dict, ref: str):
    if ref == "llamacpp":
        return next((samples[n] for n in samples if n.startswith("llamacpp")), None)
    return samples.get(ref)


def ratios(samples: dict, num_layers: int, forced: list[int]) -> dict:
    """Paired per-repeat ratios (median, min, max): decode against every reference, the stated targets,
    chain against the monolithic graph (decode and prefill), forced exits against the full chain."""
    base, chain = samples.get(BASELINE), samples.get("chain_full")
    out: dict = {}
    if base and chain:
        out["chain_full_over_monolithic_decode"] = paired_ratio(chain["decode"], base["decode"])
        out["chain_full_over_monolithic_prefill"] = {
            key.split("_")[1]: paired_ratio(chain[key], base[key]) for key in chain if key.startswith("prefill_")}
    if chain:
        out["forced_exit_over_full_decode"] = {
            str(k): paired_ratio(samples[f"chain_exit@{k}"]["decode"], chain["decode"])
            for k in forced if f"chain_exit@{k}" in samples}
        out["forced_exit_target"] = {str(k): k / num_layers + FORCED_EXIT_SLACK for k in forced}
    variants: dict = {}  # chain_<precision>_exit@K over chain_<precision>
    for name in samples:
        full, _, k = name.partition("_exit@")
        if k and full != "chain" and full in samples:
            variants.setdefault(full, {})[k] = paired_ratio(samples[name]["decode"], samples[full]["decode"])
    if variants:
        out["forced_exit_over_own_full_decode"] = variants
    if base and "transformers" in samples:
        out["transformers_over_monolithic_decode"] = paired_ratio(samples["transformers"]["decode"], base["decode"])
        out["transformers_over_monolithic_prefill"] = {
            key.split("_")[1]: paired_ratio(samples["transformers"][key], base[key])
            for key in base if key.startswith("prefill_")}
    if base:
        out["over_monolithic_decode"] = {name: paired_ratio(s["decode"], base["decode"]) for name, s in samples.items()}
    out["decode_over"] = {}
    for ref in REFERENCES:
        ref_samples = _reference(samples, ref)
        if ref_samples is not None:
            out["decode_over"][ref] = {name: paired_ratio(s["decode"], ref_samples["decode"]) for name, s in samples.items()}
    out["targets"] = []
    for (name, ref), limit in TARGETS.items():
        if name in samples and _reference(samples, ref) is not None:
            got = paired_ratio(samples[name]["decode"], _reference(samples, ref)["decode"])["median"]
            out["targets"].append({"contender": name, "reference": ref, "decode_ratio": got, "at_most": limit,
                                   "met": got <= limit})
    out["chain_overhead"] = {f"{name}/{ref}": paired_ratio(samples[name]["decode"], samples[ref]["decode"])
                             for name, ref in OVERHEADS if name in samples and ref in samples}
    return out


def summary(samples: dict) -> dict:
    return {name: {metric: stats(values) for metric, values in per.items()} for name, per in samples.items()}


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}–{s['max'] * 1e3:.2f})"


def _mb(n) -> str:
    return f"{n / 1e6:.1f}" if n else "–"


def markdown(result: dict) -> str:
    m, r, rows = result["machine"], result["ratios"], result["contenders"]
    prompts = result["settings"]["prompt_lengths"]
    refs = [ref for ref in ("monolithic", "genai_fp32", "genai_int4", "llamacpp") if ref in r.get("decode_over", {})]
    head = ["contender", "layers", *[f"prefill {n} tok, ms" for n in prompts], "decode ms/token", "tokens/s",
            *[f"decode ÷ {ref}" for ref in refs], "peak RSS MB (Δ)", "size MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if row.get("status", "ok") != "ok":
            cells = [f"`{name}`", f"{row['status']}: {row['reason']}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        t = row["timings"]
        mem = row.get("memory")
        cells = [f"`{name}`", str(row["layers"]), *[_ms(t[f"prefill_{n}"]) for n in prompts], _ms(t["decode"]),
                 f"{1 / t['decode']['median']:.1f}",
                 *[f"{r['decode_over'][ref][name]['median']:.3f}" for ref in refs],
                 f"{mem['peak_mb']:.0f} ({mem['peak_mb'] - mem['baseline_mb']:.0f})" if mem else "–",
                 _mb(row.get("size_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["settings"]
    lines += ["", f"Model: {result['model']}; {s['repeats']} repeats (median, min–max), {s['decode_tokens']} greedy tokens "
              f"decoded after the {min(prompts)}-token prompt ({s.get('prompt', 'synthetic ids')}), {s['threads']} threads. "
              f"Machine: {m['platform']}, {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; load average "
              f"at the end {m.get('load_average_at_end')}."]
    for target in r.get("targets", []):
        lines.append(f"{target['contender']} ÷ {target['reference']}, decode: {target['decode_ratio']:.3f} "
                     f"(target ≤ {target['at_most']:.2f}: {'met' if target['met'] else 'not met'}).")
    for base, per_k in r.get("forced_exit_over_own_full_decode", {}).items():
        lines.append(f"Forced exit ÷ full {base}, decode: " + ", ".join(
            f"k={k}: {v['median']:.3f} (target ≤ {int(k) / result['num_layers'] + FORCED_EXIT_SLACK:.3f})"
            for k, v in per_k.items()) + ".")
    for pair, v in r.get("chain_overhead", {}).items():
        lines.append(f"{pair.replace('/', ' ÷ ')}, decode (the chain's per-call cost on the same kernels): {v['median']:.3f}.")
    if "chain_full_over_monolithic_decode" in r:
        lines.append(f"Chain ÷ monolithic, decode: {r['chain_full_over_monolithic_decode']['median']:.3f}; prefill: "
                     + ", ".join(f"{n} tok {v['median']:.3f}" for n, v in r["chain_full_over_monolithic_prefill"].items()) + ".")
    if r.get("forced_exit_over_full_decode"):
        lines.append("Forced exit ÷ full chain, decode: " + ", ".join(
            f"k={k}: {v['median']:.3f} (target ≤ {r['forced_exit_target'][k]:.3f})"
            for k, v in r["forced_exit_over_full_decode"].items()) + ".")
    for note in result.get("notes", []):
        lines.append(note)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Decode time per token against blocks run, with the ideal (time proportional to blocks run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: row for name, row in result["contenders"].items() if row.get("status", "ok") == "ok"}
    num_layers = result["num_layers"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    chain = [(row["layers"], row["timings"]["decode"]) for name, row in rows.items()
             if name == "chain_full" or name.startswith("chain_exit@")]
    chain.sort(key=lambda x: x[0])
    if chain:
        xs = [x for x, _ in chain]
        ys = [s["median"] * 1e3 for _, s in chain]
        err = [[(s["median"] - s["q1"]) * 1e3 for _, s in chain], [(s["q3"] - s["median"]) * 1e3 for _, s in chain]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="our chain (forced exit at k, full)")
        full = rows["chain_full"]["timings"]["decode"]["median"] * 1e3 if "chain_full" in rows else ys[-1]
        ax.plot([0, num_layers], [0, full], "--", color="gray", label="ideal: time ∝ blocks run")
        if "chain_full" in rows:
            macs = sorted((row["layers"], row["macs_per_token"]) for name, row in rows.items()
                          if name == "chain_full" or name.startswith("chain_exit@"))
            macs_full = rows["chain_full"]["macs_per_token"]
            ax.plot([x for x, _ in macs], [full * m / macs_full for _, m in macs], ":", color="black",
                    label="ideal: time ∝ MACs (blocks + head)")
    markers = iter("s^vD<>pPX*hH+x")
    for name, row in rows.items():
        if name == "chain_full" or name.startswith(("chain_exit@", "chain_classifier")):
            continue
        ax.plot([row["layers"]], [row["timings"]["decode"]["median"] * 1e3], next(markers, "o"),
                label=f"{name} (full depth)")
    ax.set_xlabel("blocks run per token")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title(f"{result['model']}: decode time against depth")
    ax.set_xlim(0, num_layers + 0.5)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
