"""The speed-versus-error front: its Pareto set, and the PNG and SVG drawings of it."""

import random
import xml.etree.ElementTree as ET

import pytest

from attnopt.calibration import front as F


def _front(n=12, seed=0, budget=0.05):
    rng = random.Random(seed)
    pts = [{"time": rng.uniform(0.2, 1.0), "error": rng.uniform(0.0, 0.08), "label": f"p{i} <int8&fp8>"}
           for i in range(n)]
    under = [p for p in pts if p["error"] <= budget]
    best = min(under, key=lambda p: p["time"])
    best["chosen"], best["measured_error"] = True, best["error"] * 1.1
    return F.make_front("sm90", "analytical", 1.0, pts, budget=budget)


def test_pareto_keeps_exactly_the_undominated_points_sorted_by_error():
    pts = [{"time": 1.0, "error": 0.0}, {"time": 0.5, "error": 0.02}, {"time": 0.6, "error": 0.03},  # dominated
           {"time": 0.5, "error": 0.04}, {"time": 0.3, "error": 0.05}, {"time": 0.3, "error": 0.05}]
    assert F.pareto(pts) == [pts[0], pts[1], pts[4], pts[5]]
    rng = random.Random(1)
    for _ in range(20):  # against a brute-force definition
        pts = [{"time": rng.choice([0.1, 0.2, 0.3, 0.4]), "error": rng.choice([0.0, 0.01, 0.02])} for _ in range(9)]
        line = F.pareto(pts)
        for p in pts:
            dominated = any((q["time"], q["error"]) != (p["time"], p["error"]) and q["time"] <= p["time"]
                            and q["error"] <= p["error"] for q in pts)
            assert (p in line) == (not dominated)
        assert [p["error"] for p in line] == sorted(p["error"] for p in line)
        assert [p["time"] for p in line] == sorted((p["time"] for p in line), reverse=True)


def test_make_front_checks_its_shape():
    f = _front()
    assert set(f) == {"arch", "cost_model", "baseline_time", "points", "budget"}
    assert set(f["points"][0]) == set(F.POINT_KEYS)
    with pytest.raises(ValueError, match="more than one chosen"):
        F.make_front("sm90", "analytical", 1.0, [{"time": 1, "error": 0, "chosen": True}] * 2)
    with pytest.raises(ValueError, match=r"points\[0\].time"):
        F.make_front("sm90", "analytical", 1.0, [{"time": 0, "error": 0}])


def test_write_png_writes_a_png_matplotlib_reads_back(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "front.png"
    assert F.write_png(_front(), path) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_front_svg_is_xml_with_every_point_the_chosen_one_and_the_budget():
    f = _front()
    svg = F.front_svg(f)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    assert len([c for c in circles if "point" in c.get("class")]) == len(f["points"])
    assert len([c for c in circles if "chosen" in c.get("class")]) == 1
    assert root.find(f"{ns}polyline[@class='pareto']") is not None
    assert root.find(f"{ns}line[@class='budget']") is not None
    titles = " ".join(t.text for t in root.iter(f"{ns}title"))
    assert "<int8&fp8>" in titles  # labels escaped, and read back intact
    # the chosen point sits at its speedup: higher on the chart (smaller y) than a slower point
    best = F.chosen(f)
    slow = max(f["points"], key=lambda p: p["time"])
    y = {c.get("class"): float(c.get("cy")) for c in circles}
    assert best is not slow and y[next(k for k in y if "chosen" in k)] < max(float(c.get("cy")) for c in circles)
    ET.fromstring(F.front_svg(F.make_front("cpu", "analytical", 1.0, [])))  # an empty front draws too
