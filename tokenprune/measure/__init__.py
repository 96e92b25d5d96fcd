"""Measurement: FLOPs (measured and analytic), speed benchmarks."""

from tokenprune.measure.flops import FlopsReport, count_flops, measure_flops

__all__ = ["FlopsReport", "count_flops", "measure_flops"]
