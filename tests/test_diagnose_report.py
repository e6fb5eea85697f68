"""The diagnose report: PNG plots (deterministic bytes) and the self-contained, escaped HTML page."""

from __future__ import annotations

import base64
import math
import re
import sys
from html.parser import HTMLParser

import pytest

from normsurgery.depth.report import draw_plots, render_html, write_html
from normsurgery.depth.stats import LayerStats, NormGain

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = ["residual_norm.png", "block_influence.png", "angular_distance.png", "norm_gains.png"]
MODEL = "org/<script>alert(1)</script>-tiny"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}


def make_stats(num_layers: int = 6, skip_cost: bool = False, gains: bool = True) -> LayerStats:
    """A deterministic LayerStats from simple formulas (BI lowest in the middle blocks, a triangular angular map)."""
    L = num_layers
    bi = [0.05 + 0.1 * abs(l - (L - 1) / 2) + 0.001 * l for l in range(L)]
    angular_last = [[0.1 * n + 0.01 * l for l in range(L - n + 1)] for n in range(1, L + 1)]
    angular_all = [[0.05 * n + 0.02 * l for l in range(L - n + 1)] for n in range(1, L + 1)]
    norm_gains = [NormGain("model.layers.0.input_layernorm", 0, "input", 1.1, 0.2, 0.5, 1.9),
                  NormGain("model.layers.0.post_attention_layernorm", 0, "post_attention", 0.9, 0.1, 0.6, 1.2),
                  NormGain("model.norm", None, "final", 2.5, 0.7, 0.3, 5.0)] if gains else []
    return LayerStats(
        model=MODEL, family="llama & <friends>", num_layers=L, norm_placement="Pre-LN (RMSNorm)", tokens=4096,
        sequences=16, base_ce=3.14159265, block_influence=bi, angular_last=angular_last, angular_all=angular_all,
        residual_rms=[1.0 * 1.5 ** l for l in range(L + 1)], relative_update=[1.0 / (l + 1) for l in range(L)],
        update_cosine=[-0.1 * l for l in range(L)], norm_gains=norm_gains,
        skip_cost=[0.5 / (l + 1) - 0.01 for l in range(L)] if skip_cost else None)


class Table(HTMLParser):
    """Checks tags are balanced and collects the table rows: (class attribute, cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.rows: list[tuple[str | None, list[str]]] = []
        self.images: list[dict[str, str | None]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "tr":
            self.rows.append((attrs.get("class"), []))
        if tag in ("td", "th"):
            self.cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack)
        self.stack.pop()
        if tag in ("td", "th"):
            self.rows[-1][1].append("".join(self.cell or []))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse(page: str) -> Table:
    table = Table()
    table.feed(page)
    table.close()
    assert table.stack == []
    return table


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, bytes]:
    """The plots of make_stats(skip_cost=True), drawn once into a folder that does not exist yet: name -> bytes."""
    folder = tmp_path_factory.mktemp("plots") / "a" / "b"
    names = draw_plots(make_stats(skip_cost=True), folder)
    assert names == ALL_PNGS
    return {name: (folder / name).read_bytes() for name in names}


def test_draw_plots_writes_deterministic_pngs(drawn, tmp_path):
    assert all(data.startswith(PNG_SIGNATURE) for data in drawn.values())
    assert draw_plots(make_stats(skip_cost=True), tmp_path) == ALL_PNGS
    assert {name: (tmp_path / name).read_bytes() for name in ALL_PNGS} == drawn


def test_draw_plots_skips_norm_gains_when_empty(tmp_path):
    names = draw_plots(make_stats(gains=False), tmp_path)
    assert names == ALL_PNGS[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ALL_PNGS[:3])


def test_draw_plots_single_block(tmp_path):
    stats = make_stats(num_layers=1, skip_cost=True)
    assert stats.angular_last == [[0.1]]
    names = draw_plots(stats, tmp_path)
    assert names == ALL_PNGS
    assert (tmp_path / "angular_distance.png").read_bytes().startswith(PNG_SIGNATURE)


def test_draw_plots_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    reason = draw_plots(make_stats(), tmp_path / "plots")
    assert isinstance(reason, str) and "matplotlib is not installed" in reason
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("skip_cost", [False, True])
def test_render_html_table(skip_cost):
    stats = make_stats(skip_cost=skip_cost)
    page = render_html(stats)
    table = parse(page)
    assert page.count("<tr") == stats.num_layers + 1 == len(table.rows)
    header = table.rows[0][1]
    assert header[0] == "block" and header[1] == "BI"
    assert any("skip cost" in cell for cell in header) == skip_cost
    assert ("skip cost" in page) == skip_cost
    quarter = math.ceil(stats.num_layers / 4)
    lowest = set(sorted(range(stats.num_layers), key=lambda layer: stats.block_influence[layer])[:quarter])
    assert lowest == {2, 3}
    body = table.rows[1:]
    assert {int(cells[0]) for cls, cells in body if cls == "low-bi"} == lowest
    assert [cls for cls, _ in body].count("low-bi") == quarter
    assert all(len(cells) == len(header) for _, cells in body)
    assert body[1][1][1] == f"{stats.block_influence[1]:.4g}"
    assert body[4][1][2] == f"{stats.angular_last[0][4]:.4g}"
    assert body[0][1][4] == "0"  # update cosine -0.0, shown without its sign
    if skip_cost:
        assert body[0][1][-1] == f"{stats.skip_cost[0]:.4g}"
    assert "3.142" in page  # base CE to 4 significant digits
    assert "&lt;script&gt;" in page and "<script" not in page.lower()
    assert "llama &amp; &lt;friends&gt;" in page
    assert "data:image/png" not in page and table.images == []


def test_render_html_embeds_pngs(drawn):
    pngs = drawn
    page = render_html(make_stats(skip_cost=True), pngs)
    table = parse(page)
    assert page.count("data:image/png;base64,") == len(pngs)
    assert [img["src"] for img in table.images] == [
        "data:image/png;base64," + base64.b64encode(data).decode("ascii") for data in pngs.values()]
    decoded = [base64.b64decode(img["src"].split(",", 1)[1]) for img in table.images]
    assert decoded == list(pngs.values())
    assert all(img.get("alt") for img in table.images)


def test_write_html_self_contained(tmp_path):
    path = tmp_path / "report.html"
    assert write_html(make_stats(skip_cost=True), path) is None
    page = path.read_text(encoding="utf-8")
    parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == len(ALL_PNGS)
    assert "<script" not in page.lower()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_write_html_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "report.html"
    reason = write_html(make_stats(), path)
    assert isinstance(reason, str) and "matplotlib is not installed" in reason
    page = path.read_text(encoding="utf-8")
    parse(page)
    assert "matplotlib is not installed" in page and "data:image/png" not in page
    assert re.search(r"<tr[ >]", page)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
