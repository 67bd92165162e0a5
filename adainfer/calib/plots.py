"""Calibration plots: exit-layer histogram, and agreement against compute saved as the threshold moves."""

from __future__ import annotations

from pathlib import Path


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {}
    chosen = report["chosen"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    hist = chosen["exit_histogram"]
    ax.bar(range(1, len(hist) + 1), hist)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("held-out positions")
    ax.set_title(f"exit layers: {chosen['name']} ({chosen['classifier']})")
    fig.tight_layout()
    fig.savefig(out_dir / "calib_exit_histogram.png", dpi=100)
    plt.close(fig)
    names["plot_exit_histogram"] = "calib_exit_histogram.png"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in report["curves"].items():
        if not curve:
            continue
        saved, agreement = zip(*sorted(curve))
        ax.plot([100 * s for s in saved], agreement, marker=".", markersize=3, linewidth=1, label=name)
    rule = report["paper_rule_gap_0.8"]
    ax.scatter([100 * rule["flops_saved"]], [rule["agreement"]], color="black", marker="*", s=120, zorder=5,
               label="paper rule gap >= 0.8")
    ax.axhline(report["target_agreement"], color="grey", linestyle="--", linewidth=1)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("compute saved, % of MACs (decision cost included)")
    ax.set_ylabel("agreement with the full model")
    ax.set_title("agreement vs compute saved as the threshold moves")
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "calib_tradeoff.png", dpi=100)
    plt.close(fig)
    names["plot_tradeoff"] = "calib_tradeoff.png"
    return names
