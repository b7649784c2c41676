"""The HTML report in a real headless browser (Debian's ``chromium``): it renders, shows its figures,
and has the expected headings in the DOM. Skipped, with the reason, where chromium is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from report_data import run_a, run_b

from kvbench.report import write_report

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium): HTML report not browser-checked"
)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")
HEADINGS = ("Headline: score by method and budget", "Paired comparisons", "Score vs budget", "Score heatmaps",
            "Memory", "Speed", "Failed cells", "Run metadata")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per start
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    return write_report([run_a(root), run_b(root)], root / "out").with_name("report.html")


def test_dom_has_every_section_and_embedded_figures(page: Path, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "<h1>kvbench report: run-a, run-b</h1>" in dom
    for heading in HEADINGS:
        assert f">{heading}</h2>" in dom, heading
    assert dom.count('src="data:image/png;base64,') == 4


def test_renders_to_a_non_blank_png_with_its_figures(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", page.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 4000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "the page rendered (nearly) blank"
    assert sum(n for n, _ in colours if min(_) < 200) > 20_000, "too little ink: text, tables and figures missing"

    saturated = sum(n for n, c in colours if max(c) - min(c) > 100)  # the figures' lines and heatmap cells
    assert saturated > 20_000, "the embedded figures were not drawn"
