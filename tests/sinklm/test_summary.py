"""The experiment summary is derived from measurements, never a fixed claim."""

from __future__ import annotations

from sinklm.summary import ModelResult, summarise


def test_summary_without_sink_says_so_and_points_to_paper_scale():
    """Prevents: a laptop run that grew no sink being reported as reproducing the paper."""
    results = [
        ModelResult("vanilla", "vanilla", 0.0, {"0+256": 50.01, "1+255": 50.00, "4+252": 50.02}),
        ModelResult("sink1", "sink1", 0.02, {"0+256": 49.51, "1+255": 49.50, "4+252": 49.50}),
    ]
    text = summarise(results)
    assert "No attention sink has emerged" in text
    assert "vanilla 0%" in text and "sink1 2%" in text
    assert "do not differ" in text
    assert "paper-160m" in text
    assert "has formed" not in text


def test_summary_with_sink_reports_measured_eviction_cost():
    """Prevents: the summary ignoring a measured sink and its eviction cost."""
    results = [
        ModelResult("vanilla", "vanilla", 0.65, {"0+256": 180.0, "1+255": 32.0, "4+252": 30.0}),
        ModelResult("sink1", "sink1", 0.70, {"0+256": 120.0, "1+255": 30.5, "4+252": 30.4}),
    ]
    text = summarise(results)
    assert "An attention sink has formed in vanilla, sink1" in text
    assert "No attention sink" not in text
    assert "raises perplexity to 180.00 from 30.00" in text and "+500.0%" in text
    assert "paper-160m" not in text


def test_summary_changes_with_metric_alone():
    """Same perplexities, different sink metric: the first sentence follows the metric."""
    ppl = {"0+64": 10.0, "4+60": 10.0}
    low = summarise([ModelResult("m", "vanilla", 0.05, ppl)])
    high = summarise([ModelResult("m", "vanilla", 0.5, ppl)])
    assert low.startswith("No attention sink") and high.startswith("An attention sink has formed")
