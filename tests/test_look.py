"""What a person sees: viewer.html and plot.py's PNGs rendered by a real headless browser (Debian's
chromium, which `make setup` installs where it can). The page must show the three methods' columns
with coloured tokens, and the screenshots must really be colourful, not a blank or error page."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools import plot, viewer

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser: run make setup (it installs Debian's "
                                                        "chromium when apt-get is available) or apt-get install chromium")

# Runs in the page after it is parsed: what the browser computed, written into the DOM for --dump-dom.
PROBE = """<script>
addEventListener('load', () => {
  const heads = [...document.querySelectorAll('th')].map(th => th.textContent);
  const cols = {};
  for (const tr of document.querySelectorAll('tr')) {
    [...tr.children].forEach((td, i) => {
      if (td.tagName !== 'TD' || !heads[i]) return;
      const c = cols[heads[i]] = cols[heads[i]] || {spans: 0, colours: {}};
      for (const s of td.querySelectorAll('span')) {
        c.spans += 1;
        const bg = getComputedStyle(s).backgroundColor;
        c.colours[bg] = (c.colours[bg] || 0) + 1;
      }
    });
  }
  const imgs = [...document.images].map(im => [im.getAttribute('src'), im.complete, im.naturalWidth]);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({heads, cols, imgs});
  document.body.appendChild(out);
});
</script>"""


def browse(page: Path, tmp_path: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *mode, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def probe(page: Path, tmp_path: Path) -> dict:
    dom = browse(page, tmp_path, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the page's script did not run: " + dom[-500:]
    return json.loads(html.unescape(found.group(1)))


def colour_census(png: Path) -> dict:
    """Distinct colours and how many pixels are clearly green, red, grey or blue/orange (matplotlib's
    first two line colours)."""
    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 24)
    count = {"distinct": len(colours), "green": 0, "red": 0, "grey": 0, "blue": 0, "orange": 0}
    for n, (r, g, b) in colours:
        count["green"] += n * (g > r + 40 and g > b + 40)
        count["red"] += n * (r > g + 60 and r > b + 60 and not (r > 230 and g > 110))
        count["grey"] += n * (abs(r - g) < 8 and abs(g - b) < 8 and 150 < r < 235)
        count["blue"] += n * (b > r + 60 and b > g + 30)
        count["orange"] += n * (r > 230 and 110 < g < 160 and b < 60)
    return count


def test_viewer_page_shows_three_methods_with_coloured_tokens(tmp_path, capsys):
    page = tmp_path / "viewer.html"
    assert viewer.main(["--scripted", "--html", str(page)]) == 0
    capsys.readouterr()
    probed = tmp_path / "viewer-probe.html"
    probed.write_text(page.read_text() + PROBE)
    seen = probe(probed, tmp_path)
    methods = list(viewer.LABELS.values())
    assert seen["heads"][-3:] == methods  # the three columns, in the viewer's order
    for m in methods:
        col = seen["cols"][m]
        colours = {c for c in col["colours"] if c not in ("rgba(0, 0, 0, 0)", "transparent")}
        # every token is a span with a background: grey environment tokens and at least one green and one red
        assert col["spans"] > 100 and sum(col["colours"].get(c, 0) for c in colours) == col["spans"], m
        assert "rgb(200, 200, 200)" in colours, m
        rgb = [tuple(map(int, re.findall(r"\d+", c)[:3])) for c in colours]
        assert any(g > r for r, g, b in rgb) and any(r > g for r, g, b in rgb), (m, colours)
    # MT-GRPO splits one rollout's credit between its turns: it shows more distinct colours than GRPO-OR
    assert len(seen["cols"]["MT-GRPO"]["colours"]) > len(seen["cols"]["GRPO-OR"]["colours"])

    shot = tmp_path / "viewer.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000")
    census = colour_census(shot)
    print(f"viewer screenshot {shot}: {census}", file=sys.stderr)
    assert census["distinct"] > 50 and census["green"] > 2000 and census["red"] > 2000 and census["grey"] > 2000


def test_plots_render_in_the_browser(tmp_path):
    from helpers import fake_run  # the same fake metrics as the plot tests

    runs = {"MT-GRPO": plot.load_run(str(fake_run(tmp_path / "a", 0.2))),
            "GRPO-MR": plot.load_run(str(fake_run(tmp_path / "b", 0.5, mismatch=True)))}
    plots = plot.plot_runs(runs, tmp_path / "plots")
    page = tmp_path / "plots" / "index.html"
    page.write_text("<!doctype html><body style='margin:0'>"
                    + "".join(f"<img src='{p.path.name}' style='display:block'>" for p in plots.values()) + PROBE)
    seen = probe(page, tmp_path)
    assert [src for src, *_ in seen["imgs"]] == [p.path.name for p in plots.values()]
    for src, complete, width in seen["imgs"]:
        assert complete and width >= 400, src  # the browser decoded each PNG

    shot = tmp_path / "plots.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1600,1400")
    census = colour_census(shot)
    print(f"plots screenshot {shot}: {census}", file=sys.stderr)
    assert census["distinct"] > 50 and census["blue"] > 500 and census["orange"] > 500  # both runs' lines
