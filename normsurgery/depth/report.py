"""The `normsurgery diagnose` report for people who would rather look than read: PNG plots of the per-block
statistics and one self-contained HTML page with the table and the plots embedded.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from normsurgery.depth.stats import LayerStats

NO_MATPLOTLIB = "not drawn: matplotlib is not installed (pip install 'normsurgery[plot]')"
RESIDUAL_NORM = "residual_norm.png"
BLOCK_INFLUENCE = "block_influence.png"
ANGULAR_DISTANCE = "angular_distance.png"
NORM_GAINS = "norm_gains.png"
ALT_TEXT = {
    RESIDUAL_NORM: "Residual stream RMS entering each block (log scale) and each block's relative update",
    BLOCK_INFLUENCE: "Block influence per block, and the cross-entropy cost of skipping each block when measured",
    ANGULAR_DISTANCE: "Angular distance of every span of n blocks starting at block l, last token and all tokens",
    NORM_GAINS: "Mean effective gain of every norm, with its standard deviation and min-max range",
}
LOW_BI_CLASS = "low-bi"
MAX_NAMED_TICKS = 16  # name the norms on the x axis only when there are at most this many


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _title(stats: LayerStats, what: str) -> str:
    """A plot title naming the model, with `$` escaped so matplotlib does not read it as mathtext."""
    return f"{what}: {stats.model}".replace("$", r"\$")


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Save `fig` as a PNG with no timestamp or version metadata (deterministic bytes) and free it."""
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _integer_ticks(*axes: Any) -> None:
    """Only whole numbers on these matplotlib axes (block indices, span lengths)."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _draw_residual_norm(plt: Any, stats: LayerStats, path: Path) -> None:
    """Residual RMS (log) above, relative update below: the "Curse of Depth" signal."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), dpi=100, sharex=True, layout="constrained")
    top.plot(range(len(stats.residual_rms)), stats.residual_rms, marker="o", markersize=3, color="tab:blue")
    top.set_yscale("log")
    top.set_ylabel("residual RMS")
    top.set_title(_title(stats, "Residual stream norm"), fontsize=10)
    bottom.plot(range(len(stats.relative_update)), stats.relative_update, marker="o", markersize=3,
                color="tab:orange")
    bottom.set_ylabel("‖Δh‖ / ‖h‖")
    bottom.set_xlabel("residual stream entering block l (last point: after the last block, before the final norm)")
    _integer_ticks(bottom.xaxis)
    _save(plt, fig, path)


def _draw_block_influence(plt: Any, stats: LayerStats, path: Path) -> None:
    """Block influence per block, and the skip cost below it when it was measured; each block's attention and MLP
    sub-layers' own as markers where the blocks have them."""
    rows = 1 if stats.skip_cost is None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 4.5), dpi=100, sharex=True, squeeze=False,
                             layout="constrained")
    bi_ax = axes[0][0]
    bi_ax.bar(range(len(stats.block_influence)), stats.block_influence, color="tab:blue")
    bi_ax.set_ylabel("block influence")
    bi_ax.set_title(_title(stats, "Block influence (1 - cos(h_l, h_l+1))"), fontsize=10)
    _sublayer_markers(bi_ax, stats.attention_influence, stats.mlp_influence)
    if stats.skip_cost is not None:
        skip_ax = axes[1][0]
        skip_ax.bar(range(len(stats.skip_cost)), stats.skip_cost, color="tab:red")
        skip_ax.axhline(0.0, color="tab:gray", linewidth=0.6)
        skip_ax.set_ylabel("skip cost (nats/token)")
        _sublayer_markers(skip_ax, stats.attention_skip_cost, stats.mlp_skip_cost)
    axes[-1][0].set_xlabel("block l")
    _integer_ticks(axes[-1][0].xaxis)
    _save(plt, fig, path)


def _sublayer_markers(ax: Any, attention: list[float] | None, mlp: list[float] | None) -> None:
    """The attention and MLP sub-layers' values of each block as markers over its bar, when measured."""
    if attention is None or mlp is None:
        return
    ax.plot(range(len(attention)), attention, "o", color="tab:orange", label="attention")
    ax.plot(range(len(mlp)), mlp, "s", color="tab:green", label="MLP")
    ax.legend(fontsize=8)


def _triangle(spans: list[list[float]], num_layers: int) -> Any:
    """The angular distances as an L x L masked array: row n - 1, column l; blank where the span overruns."""
    import numpy as np

    grid = np.full((num_layers, num_layers), np.nan)
    for n_minus_1, row in enumerate(spans[:num_layers]):
        values = row[:num_layers]
        grid[n_minus_1, :len(values)] = values
    return np.ma.masked_invalid(grid)


def _draw_angular_distance(plt: Any, stats: LayerStats, path: Path) -> None:
    """Heat maps of the angular distance of every span (first block l, length n), n = 1 at the bottom."""
    size = max(stats.num_layers, 1)
    grids = [(_triangle(stats.angular_last, size), "last token"), (_triangle(stats.angular_all, size), "all tokens")]
    high = max((float(grid.max()) for grid, _ in grids if grid.count()), default=0.0) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.5), dpi=100, sharey=True, layout="constrained")
    extent = (-0.5, size - 0.5, 0.5, size + 0.5)
    for ax, (grid, label) in zip(axes, grids):
        image = ax.imshow(grid, origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=0.0, vmax=high,
                          interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("first block l")
        _integer_ticks(ax.xaxis, ax.yaxis)
    axes[0].set_ylabel("span length n (blocks)")
    fig.colorbar(image, ax=list(axes), label="angular distance arccos(cos) / π")
    fig.suptitle(_title(stats, "Angular distance of h_l to h_l+n"), fontsize=10)
    _save(plt, fig, path)


def _draw_norm_gains(plt: Any, stats: LayerStats, path: Path) -> None:
    """Mean effective gain of every norm in order, with std error bars and a min-max bar."""
    gains = stats.norm_gains
    xs = range(len(gains))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax.vlines(xs, [g.min for g in gains], [g.max for g in gains], color="tab:blue", alpha=0.25, linewidth=5,
              label="min-max over channels")
    ax.errorbar(xs, [g.mean for g in gains], yerr=[g.std for g in gains], fmt="o", markersize=3, capsize=2,
                color="tab:blue", label="mean ± std")
    ax.axhline(1.0, color="tab:gray", linestyle="--", linewidth=0.6)
    if len(gains) <= MAX_NAMED_TICKS:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([g.name for g in gains], rotation=90, fontsize=6)
    else:
        _integer_ticks(ax.xaxis)
        ax.set_xlabel("norm index (in model order)")
    ax.set_ylabel("effective gain")
    ax.set_title(_title(stats, "Norm gains"), fontsize=10)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def draw_plots(stats: LayerStats, folder: Path) -> list[str] | str:
    """Draw the diagnose plots as PNGs into `folder` (created if missing) for the HTML report or a look by eye.

    Returns the file names written, or why nothing was drawn (matplotlib missing).
    """
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    folder.mkdir(parents=True, exist_ok=True)
    drawers = [(RESIDUAL_NORM, _draw_residual_norm), (BLOCK_INFLUENCE, _draw_block_influence),
               (ANGULAR_DISTANCE, _draw_angular_distance)]
    if stats.norm_gains:
        drawers.append((NORM_GAINS, _draw_norm_gains))
    for name, draw in drawers:
        draw(plt, stats, folder / name)
    return [name for name, _ in drawers]


def _num(value: float) -> str:
    """A number to 4 significant digits (0, not -0)."""
    return f"{value + 0.0:.4g}"


def _low_bi_blocks(stats: LayerStats) -> set[int]:
    """The quarter of the blocks (rounded up) with the lowest block influence, NaN last: the first to prune."""
    bi = stats.block_influence
    order = sorted(range(len(bi)), key=lambda layer: (bi[layer] if math.isfinite(bi[layer]) else math.inf, layer))
    return set(order[:math.ceil(len(bi) / 4)])


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
h1 { font-size: 1.4em; word-break: break-all; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; }
tr.low-bi td { background: #fff1b8; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
.note { color: #8a5a00; }
"""


def _header(stats: LayerStats) -> list[str]:
    """The model's identity and the calibration it was measured on, as a definition list."""
    rms_out = _num(stats.residual_rms[-1]) if stats.residual_rms else "-"
    fields = [("model", stats.model), ("family", stats.family), ("norm placement", stats.norm_placement),
              ("blocks", str(stats.num_layers)),
              ("calibration", f"{stats.tokens} tokens in {stats.sequences} sequences"),
              ("base cross-entropy", f"{_num(stats.base_ce)} nats/token"),
              ("residual RMS after the last block (before the final norm)", rms_out)]
    return ["<dl>", *(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in fields), "</dl>"]


def _table(stats: LayerStats) -> list[str]:
    """One row per block; the lowest-BI quarter highlighted."""
    columns = ["block", "BI", "angular distance (n=1, last token)", "relative update", "update cosine",
               "residual RMS entering"]
    if stats.skip_cost is not None:
        columns.append("skip cost (nats/token)")
    sublayer_columns = [(label, values) for label, values in (
        ("attention BI", stats.attention_influence), ("MLP BI", stats.mlp_influence),
        ("attention skip cost", stats.attention_skip_cost), ("MLP skip cost", stats.mlp_skip_cost))
        if values is not None]
    columns += [label for label, _ in sublayer_columns]
    lines = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr></thead>",
             "<tbody>"]
    low = _low_bi_blocks(stats)
    first_spans = stats.angular_last[0] if stats.angular_last else []
    rows = zip(range(stats.num_layers), stats.block_influence, first_spans, stats.relative_update,
               stats.update_cosine, stats.residual_rms)
    for layer, *values in rows:
        cells = [str(layer), *map(_num, values)]
        if stats.skip_cost is not None:
            cells.append(_num(stats.skip_cost[layer]))
        cells += [_num(values[layer]) for _, values in sublayer_columns]
        attrs = f' class="{LOW_BI_CLASS}"' if layer in low else ""
        lines.append(f"<tr{attrs}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def _figures(pngs: dict[str, bytes]) -> list[str]:
    """Every PNG embedded as a data URI, with alt text and a caption."""
    lines = []
    for name, data in pngs.items():
        alt = html.escape(ALT_TEXT.get(name, name))
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        lines.append(f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
    return lines


def _render(stats: LayerStats, pngs: dict[str, bytes] | None, note: str | None) -> str:
    """The page of `render_html`, with `note` (why there are no plots) shown in place of the plots."""
    title = html.escape(f"normsurgery diagnose: {stats.model}")
    lines = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{title}</title>",
             f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{title}</h1>", *_header(stats),
             "<h2>Blocks</h2>",
             "<p>Highlighted rows: the 25% of blocks with the lowest block influence (BI), the first candidates "
             "for pruning.</p>", *_table(stats)]
    if pngs or note:
        lines.append("<h2>Plots</h2>")
    if note:
        lines.append(f'<p class="note">{html.escape(note)}</p>')
    lines += [*_figures(pngs or {}), "</body>", "</html>"]
    return "\n".join(lines) + "\n"


def render_html(stats: LayerStats, pngs: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page (inline style, images as data URIs) with the per-block table and the plots.

    `pngs` maps file names (as from `draw_plots`) to PNG bytes; every string from `stats` is escaped.
    """
    return _render(stats, pngs, None)


def write_html(stats: LayerStats, path: Path) -> str | None:
    """Draw the plots, embed them in the HTML report and write it to `path` atomically (no half-written page).

    Returns None, or why the page has no images (matplotlib missing).
    """
    with tempfile.TemporaryDirectory() as tmp:
        drawn = draw_plots(stats, Path(tmp))
        note = drawn if isinstance(drawn, str) else None
        pngs = None if isinstance(drawn, str) else {name: (Path(tmp) / name).read_bytes() for name in drawn}
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(_render(stats, pngs, note), encoding="utf-8")
    os.replace(partial, path)
    return note
