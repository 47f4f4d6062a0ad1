"""The link: per-layer NQM predictions from a run's measured curvature and noise, beside the
measured oscillation and gradient norm, with agreement scores (:mod:`.core`)."""

from experiments.linking.core import link, link_run, link_trace
from experiments.linking.report import format_report, layer_table, link_scores

__all__ = ["format_report", "layer_table", "link", "link_run", "link_scores", "link_trace"]
