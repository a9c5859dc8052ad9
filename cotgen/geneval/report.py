"""GenEval summaries people read: a JSON file, a text table and a bar chart of the tags."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cotgen.world.prompts import TAGS  # noqa: E402


def write_summary(path: str | Path, summary: dict) -> None:
    """Write a summary dict as indented JSON (``dvc metrics show`` reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def format_table(summary: dict) -> str:
    """A plain-text table: one line per tag, then overall, % correct images and prompts."""
    rows = [f"{tag:<16} {summary['tags'][tag]:6.2%}" for tag in TAGS if tag in summary["tags"]]
    rows.append(f"{'overall':<16} {summary['overall']:.4f}")
    rows.append(f"{'correct images':<16} {summary['correct_images']:6.2%} of {summary['images']}")
    rows.append(f"{'correct prompts':<16} {summary['correct_prompts']:6.2%} of {summary['prompts']}")
    if summary.get("missing_prompts"):
        rows.append(f"{'missing prompts':<16} {summary['missing_prompts']}")
    return "\n".join(rows)


def plot_tags(path: str | Path, summary: dict, title: str = "GenEval") -> None:
    """Bar chart PNG of the six tag scores (0-1) with the overall as a dashed line."""
    tags = [t for t in TAGS if t in summary["tags"]]
    values = [summary["tags"][t] for t in tags]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    bars = ax.bar(tags, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=9)
    ax.axhline(summary["overall"], color="#c44e52", linestyle="--", label=f"overall {summary['overall']:.3f}")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("fraction of images correct")
    ax.set_title(f"{title} ({summary['images']} images, {summary['prompts']} prompts)")
    ax.legend(loc="lower right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
