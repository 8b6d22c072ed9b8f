"""Cascade results as a Markdown table (stages x domains, best per domain marked) and PNG plots:
the per-domain scores across stages, and for each stage trained on a learned reward its reward
model's score beside the verifiers' ground truth and the KL to the reference, step by step (a
reward model being gamed shows as its score rising while the ground truth does not), and for the
domains evaluated by episodes (agentic, e.g. swe) their success by number of turns after each
stage: first try (one turn) vs after reading tool feedback."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

REWARD_KEYS = ("reward_mean", "ground_truth_mean", "kl")  # reward-hacking visibility


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
                ci = st.get("eval_ci95", {}).get(d)
                half = f" ±{(ci[1] - ci[0]) / 2:.1f}" if ci and None not in ci else ""
                cells.append(f"{v:.1f}{half}{mark}")
        lines.append(
            f"| {st['name']} | {st['type']} | {', '.join(st['domains'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def paired_lines(summary: dict) -> list[str]:
    """One line per stage with paired differences (`paired_ci95`): each reference stage (its
    start; MOPD's teachers) and, on the stage's own domains, the difference with its paired 95%
    interval over the same held-out problems."""
    lines = []
    for st in summary["stages"]:
        parts = []
        for ref, doms in st.get("paired_ci95", {}).items():
            cells = [
                f"{d} {x[0]:+.1f}" + (f" [{x[1]:+.1f}, {x[2]:+.1f}]" if x[1] is not None else "")
                for d, x in sorted(doms.items())
                if d in st["domains"]
            ]
            if cells:
                parts.append(f"vs `{ref}`: " + ", ".join(cells))
        if parts:
            lines.append(f"- `{st['name']}` " + "; ".join(parts))
    return lines


def episode_table(summary: dict) -> str:
    """Stages x agentic domains: held-out success rate, split into first-turn successes and
    successes after tool feedback, with mean turns and tool calls per episode ("" if no stage
    evaluated a domain by episodes)."""
    rows = [
        (st["name"], d, m) for st in summary["stages"] for d, m in st.get("episodes", {}).items()
    ]
    if not rows:
        return ""
    lines = [
        "| stage | domain | success % | first turn % | after feedback % | turns | tool calls |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, d, m in rows:
        lines.append(
            f"| {name} | {d} | {100 * m['success_rate']:.1f} | "
            f"{100 * m['success_first_turn']:.1f} | {100 * m['success_after_feedback']:.1f} | "
            f"{m['turns']:.2f} | {m['tool_calls']:.2f} |"
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


def eval_curves(workdir: str, stage: str) -> dict[str, list[tuple[int, float]]]:
    """{domain: [(step, held-out score)]} of the evaluations inside a stage (`eval/<domain>` in
    its metrics.jsonl: an SFT's stop checks, an RL stage's `eval_every`); {} if none."""
    path = os.path.join(workdir, "stages", stage, "metrics.jsonl")
    curves: dict[str, list[tuple[int, float]]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                for k, v in r.items():
                    if k.startswith("eval/") and isinstance(v, int | float):
                        curves.setdefault(k[len("eval/") :], []).append((int(r["step"]), v))
    return curves


def plot_eval_curves(curves: dict, stage: str, path: str, stop_at: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d, pts in sorted(curves.items()):
        line = ax.plot(*zip(*pts, strict=True), marker=".", label=d)[0]
        if stop_at and d in stop_at:
            ax.axhline(stop_at[d], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out score (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(
        f"{stage}: held-out scores during the stage" + (" (dotted: stop_at)" if stop_at else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reward_curves(workdir: str, stage: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} of `REWARD_KEYS` in a stage's metrics.jsonl (stages trained on a
    learned reward log `ground_truth_mean`; others have no curve)."""
    path = os.path.join(workdir, "stages", stage, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            for k in REWARD_KEYS:
                v = r.get(k)
                if isinstance(v, int | float) and math.isfinite(v):
                    curves.setdefault(k, []).append((int(r["step"]), float(v)))
    return curves if "ground_truth_mean" in curves else {}


def plot_reward_curves(curves: dict, stage: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, label in (("reward_mean", "reward model"), ("ground_truth_mean", "ground truth")):
        if k in curves:
            ax.plot(*zip(*curves[k], strict=True), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the rollouts")
    if "kl" in curves:
        kl = ax.twinx()
        kl.plot(*zip(*curves["kl"], strict=True), color="gray", linestyle="--", label="KL to ref")
        kl.set_ylabel("KL to the reference (k3)")
        kl.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{stage}: reward model vs ground truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict, workdir: str, domains: Sequence[str]) -> None:
    """Writes `report.md`, `scores.png` and one `reward_<stage>.png` per stage trained on a
    learned reward in `workdir`."""
    table = markdown_table(summary, domains)
    teachers = ", ".join(f"{d}: {s}" for d, s in sorted(summary["teachers"].items()))
    text = (
        "# Cascade report\n\nHeld-out score (%) per domain after each stage, ± the half-width "
        "of its 95% interval over problems; **(best)** marks the checkpoint registered as that "
        "domain's teacher.\n\n"
        + table
        + f"\n\nTeachers (best stage per domain): {teachers}\n\n![scores](scores.png)\n"
    )
    paired = paired_lines(summary)
    if paired:
        text += (
            "\nEach stage against its start (and MOPD against its teachers) on its own domains: "
            "the difference with its paired 95% interval (the same held-out problems scored by "
            "both checkpoints, so the problems' own difficulty cancels):\n\n"
            + "\n".join(paired)
            + "\n"
        )
    episodes = episode_table(summary)
    if episodes:
        text += (
            "\nAgentic domains, held-out episodes: success by number of turns (first try vs "
            "after reading tool output):\n\n" + episodes + "\n"
        )
    for st in summary["stages"]:
        if "stopped_at" in st:
            got = ", ".join(f"{d} {v:.1f}" for d, v in sorted(st["stopped_at"].items()))
            text += (
                f"\n`{st['name']}` stopped at step {st.get('steps_done')}, the first check where "
                f"every stop_at score was reached ({got}).\n"
            )
        points = eval_curves(workdir, st["name"])
        if points:
            plot_eval_curves(
                points,
                st["name"],
                os.path.join(workdir, f"curve_{st['name']}.png"),
                st.get("stop_at"),
            )
            text += f"\n![{st['name']} during training](curve_{st['name']}.png)\n"
        if "rm_eval" in st:
            m = st["rm_eval"]
            text += (
                f"\nReward model `{st['name']}`: held-out pair accuracy "
                f"{100 * m.get('eval_accuracy', float('nan')):.1f}%, margin "
                f"{m.get('eval_margin', float('nan')):.2f}.\n"
            )
        curves = reward_curves(workdir, st["name"])
        if curves:
            first, last = curves["ground_truth_mean"][0][1], curves["ground_truth_mean"][-1][1]
            text += (
                f"\n`{st['name']}` trained on a learned reward: ground truth of its rollouts "
                f"{100 * first:.1f}% -> {100 * last:.1f}%; reward model score, ground truth "
                f"and KL per step:\n\n![{st['name']}](reward_{st['name']}.png)\n"
            )
            plot_reward_curves(
                curves, st["name"], os.path.join(workdir, f"reward_{st['name']}.png")
            )
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    plot_scores(summary, domains, os.path.join(workdir, "scores.png"))
