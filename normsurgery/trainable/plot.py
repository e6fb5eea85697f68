"""The loss curve of a fine-tune as a PNG beside the model (matplotlib, the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

LOSS_CURVE = "loss_curve.png"


def draw_loss_curve(losses: list[float], marks: dict[int, str], title: str, path: Path) -> str | None:
    """Draw the per-step loss with a dashed line at each marked step (e.g. a norm frozen there) into `path`.

    Returns None when drawn, or why not (matplotlib missing) for the report.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'normsurgery[plot]')"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(range(len(losses)), losses, linewidth=1.0, color="tab:blue")
    for step, label in sorted(marks.items()):
        ax.axvline(step, color="tab:gray", linestyle="--", linewidth=0.6)
        ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6, va="top",
                    ha="right", color="tab:gray")
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return None
