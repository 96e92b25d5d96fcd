"""What one patch's installed wrappers share: the method, its schedule and the state of the forward in flight."""

from __future__ import annotations

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.schedule import resolve_schedule
from tokenprune.methods.base import Method
from tokenprune.state import TokenState


class Runtime:
    """What the installed wrappers share: the method, the schedule and this forward's state.

    Adapters call :meth:`begin` when a forward enters the first layer; it makes a fresh
    :class:`TokenState` and resolves the schedule for that forward's token count.
    """

    def __init__(self, method: Method, config: ReductionConfig, depth: int, num_protected: int) -> None:
        self.method = method
        self.config = config
        self.depth = depth
        self.num_protected = num_protected
        self.enabled = True
        self.schedule_spec: int | list[int] = getattr(config, "r", 0)  # VLM configs have no r
        self.schedule: list[int] = [0] * depth
        self.state: TokenState | None = None
        self._resolved: dict[int, list[int]] = {}

    def schedule_for(self, num_tokens: int) -> list[int]:
        """Per-layer removal counts for a forward entering the first layer with ``num_tokens``."""
        if num_tokens not in self._resolved:
            self._resolved[num_tokens] = resolve_schedule(
                self.schedule_spec, self.depth, num_tokens, self.num_protected, self.method.max_removable
            )
        return self._resolved[num_tokens]

    def begin(self, x: torch.Tensor) -> TokenState:
        """Start a forward on ``x`` ``(B, N, C)``: fresh state, schedule for ``N``."""
        self.schedule = self.schedule_for(x.shape[1])
        self.state = TokenState.start(x, self.num_protected, self.config.trace_source)
        return self.state
