"""Cascade results as a Markdown table (stages x domains, best per domain marked) and a PNG plot."""

from __future__ import annotations

import os
from collections.abc import Sequence


def markdown_table(summary: dict, domains: Sequence[str]) -> str:
    lines = [
        "| stage | type | trained on | " + " | ".join(domains) + " |",
        "|---|---|---|" + "---:|" * len(domains),
    ]
    for st in summary["stages"]:
        cells = []
        for d in domains:
            v = st["eval"].get(d)
            if v is None:
                cells.append("")
            else:
                mark = " **(best)**" if summary["teachers"].get(d) == st["name"] else ""
                cells.append(f"{v:.1f}{mark}")
        lines.append(
            f"| {st['name']} | {st['type']} | {', '.join(st['domains'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot_scores(summary: dict, domains: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in summary["stages"]]
    fig, ax = plt.subplots(figsize=(1.4 * max(len(names), 3) + 2, 3.6))
    for d in domains:
        ax.plot(
            names, [s["eval"].get(d, float("nan")) for s in summary["stages"]], marker="o", label=d
        )
    ax.set_ylabel("held-out score (%)")
    ax.set_xlabel("after stage")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Per-domain score across Cascade stages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict, workdir: str, domains: Sequence[str]) -> None:
    """Writes `report.md` and `scores.png` in `workdir`."""
    table = markdown_table(summary, domains)
    teachers = ", ".join(f"{d}: {s}" for d, s in sorted(summary["teachers"].items()))
    text = (
        "# Cascade report\n\nHeld-out score (%) per domain after each stage; **(best)** marks "
        "the checkpoint registered as that domain's teacher.\n\n"
        + table
        + f"\n\nTeachers (best stage per domain): {teachers}\n\n![scores](scores.png)\n"
    )
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    plot_scores(summary, domains, os.path.join(workdir, "scores.png"))
