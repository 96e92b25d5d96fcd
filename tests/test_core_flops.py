"""FLOPs: the counter's convention, the report, and a budget of one (analytic == measured and budgets within 2%
for every method x form: test_vit_matrix)."""

from __future__ import annotations

import torch

import tokenprune
from tests.conftest import build


def test_flops_are_two_times_macs_of_a_linear():
    layer = torch.nn.Linear(10, 20)
    report = tokenprune.count_flops(layer, torch.randn(3, 10))
    assert report.measured == 2 * 10 * 20  # per example
    assert report.analytic is None  # no adapter knows a bare Linear


def test_budget_of_one_removes_nothing():
    model, images, _ = build("deit_tiny")
    patch = tokenprune.apply(model, "tome", flops=1.0)
    assert patch.schedule == [0] * len(model.blocks)


def test_flops_report_table_and_dict():
    model, images, _ = build("deit_tiny")
    tokenprune.apply(model, "tome", r=8)
    report = tokenprune.count_flops(model, images)
    table = report.table()
    assert "| 0 | 197 | 189 |" in table and "| 11 | 109 | 101 |" in table
    data = report.to_dict()
    assert data["flops_convention"] == "2 x MAC" and len(data["layers"]) == 12
