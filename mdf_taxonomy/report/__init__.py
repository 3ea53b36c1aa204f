"""The taxonomy report: one self-contained HTML file and its facts as JSON, built from the
artifact and a bounded sample of labelled rows."""

from mdf_taxonomy.report.build import build_report, compute_facts

__all__ = ["build_report", "compute_facts"]
