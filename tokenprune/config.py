"""What every method configuration shares: keyword-option handling and the ViT reduction options.

Each method's own config dataclass lives beside it in ``tokenprune/methods/``. A ViT config accepts either a
schedule ``r`` or a FLOPs budget ``flops`` (fraction of the unreduced model's FLOPs, solved into a schedule
when the patch is applied). ``from_dict`` rejects unknown keys with the list of valid ones, so typos never
pass silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigOptions:
    """Keyword-option handling every method config shares (mixed into dataclasses)."""

    @classmethod
    def field_names(cls) -> list[str]:
        """Valid option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ConfigOptions:
        """Build from keyword options, rejecting unknown keys with the valid ones listed."""
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {cls.field_names()}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return dataclasses.asdict(self)


@dataclass
class ReductionConfig(ConfigOptions):
    """Options shared by every token-reduction method.

    Attributes:
        r: Tokens removed per layer (int, capped like ToMe once few remain) or one exact count per layer.
        flops: Instead of ``r``: target FLOPs as a fraction of the unreduced model, in (0, 1].
        input_size: ``(H, W)`` (or one int) the budget is solved for; required for dynamic-size models.
        trace_source: Track which original tokens every token holds (``patch.state.source``).
    """

    r: int | list[int] = 0
    flops: float | None = None
    input_size: int | tuple[int, int] | None = None
    trace_source: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, (bool, str)) or not isinstance(self.r, (int, Sequence)):
            raise TypeError(f"r must be an int or a list of ints, got {self.r!r}")
        if isinstance(self.r, Sequence):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in self.r):
                raise TypeError(f"a list schedule r must hold ints, got {self.r!r}")
            self.r = list(self.r)
        if isinstance(self.r, int) and self.r < 0:
            raise ValueError(f"r must be >= 0, got {self.r}")
        if isinstance(self.r, list) and any(v < 0 for v in self.r):
            raise ValueError(f"every entry of r must be >= 0, got {self.r}")
        if self.flops is not None:
            if isinstance(self.flops, bool) or not isinstance(self.flops, (int, float)):
                raise TypeError(f"flops must be a number in (0, 1], got {self.flops!r}")
            if not 0.0 < float(self.flops) <= 1.0:
                raise ValueError(f"flops budget must be in (0, 1] (fraction of the unreduced FLOPs), got {self.flops}")
            if self.r != 0:
                raise ValueError("give either r or flops, not both")
            self.flops = float(self.flops)
        if self.input_size is not None:
            size = (self.input_size, self.input_size) if isinstance(self.input_size, int) else self.input_size
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"input_size must be an int or (H, W) of positive ints, got {self.input_size!r}")
            self.input_size = tuple(size)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (tuples become lists)."""
        out = super().to_dict()
        if out["input_size"] is not None:
            out["input_size"] = list(out["input_size"])
        return out
