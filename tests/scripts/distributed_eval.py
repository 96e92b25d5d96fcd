"""Launched by tests/test_cli_eval.py under torchrun (2 CPU processes, gloo): prints the summed result."""

import json
import sys

import torch

from tokenprune.measure.accuracy import distributed_context, evaluate_dataset


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.linear(x.flatten(1))


def dataset():
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(37, 12, generator=generator), torch.randint(0, 3, (37,), generator=generator)
    )


if __name__ == "__main__":
    rank, world = distributed_context()
    result = evaluate_dataset(Tiny(), dataset(), batch_size=5, progress=False)
    if rank == 0:
        sys.stdout.write("RESULT " + json.dumps({**result, "world": world}) + "\n")
