"""The plots' own arithmetic, and the captions the report gives them."""

from html import escape

import numpy as np

from analysis import plots, report
from analysis.compute import Options, analyse
from analysis.simulate import simulated_runs


def test_smoothing_keeps_a_constant_and_tracks_a_step_without_a_start_bias():
    assert np.allclose(plots.smooth(np.full(50, 3.0)), 3.0)  # no pull towards zero at the start
    step = np.r_[np.zeros(50), np.ones(50)]
    smoothed = plots.smooth(step)
    assert smoothed[49] == 0 and 0 < smoothed[52] < 1 and smoothed[-1] > 0.99
    noisy = 2.0 + np.random.default_rng(0).normal(0, 1, 400)
    assert plots.smooth(noisy)[100:].std() < 0.4 * noisy[100:].std()


def test_report_captions_say_what_each_plot_shows(tmp_path):
    res = analyse(simulated_runs(90), Options(buckets=3))
    images = plots.draw_all(res, tmp_path)
    report.write(res, tmp_path, images)
    html, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert set(images) == set(plots.CAPTIONS)
    for name in images:
        assert f"<figcaption>{escape(plots.CAPTIONS[name])}</figcaption>" in html and f"*{plots.CAPTIONS[name]}*" in md
        assert f"<figcaption>{name}</figcaption>" not in html
