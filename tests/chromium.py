"""Headless Chromium for the swarm page tests: the DOM after the page's JS ran, a screenshot, and
checks on that screenshot. Tests that need it skip, saying why, where /usr/bin/chromium is missing
(scripts/system_deps.sh installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

WINDOW = (1280, 1000)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian's chromium package; scripts/system_deps.sh installs it)")
    return path


def _run(url: str, mode: list[str], budget_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        args = [chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}", "--no-first-run",
                f"--virtual-time-budget={budget_ms}", *mode, url]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")   # Chromium refuses to run as root with its sandbox
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=profile)
    assert p.returncode == 0, f"chromium exited {p.returncode}: {p.stderr[-2000:]}"
    return p


def dump_dom(url: str, budget_ms: int = 4000, timeout_s: float = 90) -> str:
    """The serialized DOM once the page's scripts ran for `budget_ms` of virtual time, without the
    page's own script (whose source would match what a test looks for in the rendered page)."""
    dom = _run(url, ["--dump-dom"], budget_ms, timeout_s).stdout
    head, sep, _ = dom.rpartition('<script>\n"use strict";')
    assert sep, f"not the swarm page: {dom[:500]}"
    return head


def screenshot(url: str, out: Path, budget_ms: int = 4000, timeout_s: float = 90) -> Path:
    _run(url, [f"--screenshot={out}"], budget_ms, timeout_s)
    assert out.exists(), f"chromium wrote no screenshot at {out}"
    return out


def line_colors(dom: str) -> dict[str, str]:
    """peer id -> stroke color of its line in the chart (`<path class="line" ... data-peer=...>`)."""
    out = {}
    for tag in re.findall(r"<path [^>]*class=\"line\"[^>]*>", dom):
        peer = re.search(r'data-peer="([^"]*)"', tag)
        stroke = re.search(r'stroke="(#[0-9a-fA-F]{6})"', tag)
        assert peer and stroke, f"a chart line without its peer or color: {tag}"
        out[peer.group(1)] = stroke.group(1)
    return out


def chart_box(dom: str) -> tuple[int, int, int, int]:
    match = re.search(r'id="chart"[^>]*data-box="(\d+),(\d+),(\d+),(\d+)"', dom)
    assert match, "the chart has no data-box: its JS did not draw any line"
    return tuple(int(v) for v in match.groups())  # type: ignore[return-value]


def color_pixels(png: Path, color: str, box: tuple[int, int, int, int], tolerance: int = 24) -> int:
    """How many pixels inside `box` (left, top, width, height) are within `tolerance` of `color`."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(png)
    rgb = (image[..., :3] * 255).astype(np.int16) if image.dtype != np.uint8 else image[..., :3].astype(np.int16)
    left, top, width, height = box
    crop = rgb[top:top + height, left:left + width]
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(crop - target).max(axis=-1) <= tolerance).sum())


def check_screenshot(png: Path, dom: str) -> dict[str, int]:
    """A PNG of the window's size, not blank, whose chart area holds every line's color; returns
    the pixel count per peer."""
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (WINDOW[1], WINDOW[0]), f"screenshot is {image.shape[1]}x{image.shape[0]}"
    assert image[..., :3].std() > 0.05, "the screenshot is blank"
    box = chart_box(dom)
    counts = {peer: color_pixels(png, color, box) for peer, color in line_colors(dom).items()}
    assert counts and all(n >= 20 for n in counts.values()), f"line colors in the chart area: {counts}"
    return counts
