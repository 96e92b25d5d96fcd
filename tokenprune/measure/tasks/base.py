"""The task protocol of the eval harness: what one task (classification, segmentation, VQA) provides.

A task loads its model and data, lists the settings of a sweep, evaluates one setting, and says how a result
reads as a table row and a point of the Pareto plot. :mod:`tokenprune.measure.sweep` runs every task with the
same loop (resume from the per-run JSON, JSON per run, table, plot).
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tokenprune.methods.variants import is_control


@dataclass(frozen=True)
class Setting:
    """One run of a sweep (or of ``tokenprune eval``).

    Attributes:
        method: Its name in tables and file names (a registered method or a variant).
        options: Method options.
        file: Its JSON file name in the sweep's folder.
        fields: Filed with its result, e.g. ``{"budget": 0.5}`` or ``{"setting": "threshold=0.95"}``.
    """

    method: str
    options: dict[str, Any]
    file: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """A table column: its header, its cell for a result, and what a failed run shows there."""

    header: str
    cell: Callable[[dict[str, Any]], str]
    error: Callable[[dict[str, Any]], str] = lambda row: ""


@dataclass(frozen=True)
class PlotSpec:
    """The Pareto plot of a task: one line per method, the control as a star.

    Attributes:
        x: Key of the cost (e.g. ``"gflops_per_image"``).
        y: Key of the score (a fraction; plotted as %).
        xlabel: The x-axis label.
        ylabel: The y-axis label.
        size: Figure size in inches.
        title_size: Title font size.
        wrap: Wrap the title at this many characters (None: one line).
        through_control: Each method's line also ends at the control's point.
    """

    x: str
    y: str
    xlabel: str
    ylabel: str
    size: tuple[float, float] = (6.4, 4.4)
    title_size: int = 10
    wrap: int | None = None
    through_control: bool = True


@dataclass
class Loaded:
    """What a task loaded once for all its settings."""

    model: Any
    data: Any
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One kind of evaluation; a module of :mod:`tokenprune.measure.tasks` defines one as ``TASK``."""

    #: Table columns, in order.
    columns: ClassVar[list[Column]]
    #: The Pareto plot.
    plot: ClassVar[PlotSpec]
    #: With ``--resume``, results of earlier sweeps into the same folder stay in the table and plot.
    shares_folder: ClassVar[bool] = False
    #: Whether its sweep takes ``--tokens`` (visual tokens per image) instead of ``--flops``.
    takes_tokens: ClassVar[bool] = False

    @abstractmethod
    def load(self, args: argparse.Namespace) -> Loaded:
        """Model and data for ``args`` (``--model``, ``--data``, ``--limit``, ``--split``, ``--checkpoint``)."""

    @abstractmethod
    def eval_setting(self, args: argparse.Namespace) -> Setting:
        """The one setting ``tokenprune eval`` runs (``--method``, ``--flops``, ``--set``)."""

    @abstractmethod
    def settings(self, loaded: Loaded, args: argparse.Namespace, done: Mapping[str, dict]) -> Iterator[Setting]:
        """The settings of ``tokenprune sweep``, in run order; ``done`` holds the results so far by file name."""

    @abstractmethod
    def evaluate(self, loaded: Loaded, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
        """The result of one setting; the model is unpatched again afterwards."""

    def table_columns(self, rows: list[dict[str, Any]]) -> list[Column]:
        """The columns of a table of ``rows`` (:attr:`columns` unless a task adapts them to its results)."""
        return self.columns

    def plot_spec(self, rows: list[dict[str, Any]]) -> PlotSpec:
        """The plot of ``rows`` (:attr:`plot` unless a task adapts it to its results)."""
        return self.plot

    def after(self, loaded: Loaded, setting: Setting, row: dict[str, Any], args: argparse.Namespace) -> None:
        """Called after each sweep setting (e.g. extra figures); nothing by default."""
        return None

    def order(self, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
        """Rows in table order: the ``--methods`` order (else first seen), then highest budget first."""
        names = method_order(rows, args)
        return sorted(rows, key=lambda row: (names.index(row["method"]), -(row.get("budget") or 1.0)))

    def title(self, args: argparse.Namespace, loaded: Loaded) -> str:
        """The plot title."""
        return f"{args.model} ({loaded.description})"


def method_order(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """``--methods`` in order (when given), then any other method of ``rows`` in first-seen order."""
    given = getattr(args, "methods", None)
    names = given.split(",") if given else []
    return list(dict.fromkeys([*names, *(row["method"] for row in rows)]))


def budget_settings(
    names: list[str], budgets: list[float], options: Callable[[str, float], dict[str, Any]]
) -> list[Setting]:
    """(method, budget) settings: the control only at 1.0, reducing methods only below 1.0.

    Budget-major, in the order given: an interrupted sweep has compared every method at its first budgets.
    """
    return [
        Setting(name, options(name, budget), f"{name}_{budget}.json", {"budget": budget})
        for budget in map(float, budgets)
        for name in names
        if is_control(name) == (budget >= 1.0)
    ]
