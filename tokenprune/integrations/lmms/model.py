"""The ``tokenprune`` lmms-eval model: a supported vision-language model, reduced by a tokenprune method.

    lmms-eval --model tokenprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=aim,flops=0.25,dtype=bfloat16 \\
        --tasks pope --batch_size 8

``pretrained``: a zoo name, a local Hugging Face directory, or a hub id (:mod:`tokenprune.measure.models`;
``allow_download=true`` lets a hub id download, else it must be in the local cache). ``method`` (default
``none``) and every other model argument not listed below are the method's options (``flops=0.25``,
``tokens=64``, ...), validated like ``tokenprune.apply``. Generation is greedy (sampling options are refused):
prompts go through the model's chat template (:mod:`tokenprune.measure.answers`), the same code as
``tokenprune eval``. Multi-GPU: ``accelerate launch -m lmms_eval ...`` runs one replica per process; lmms-eval
shards the requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from tokenprune.measure.answers import generate_answers, prompt_text

_OWN = ("pretrained", "method", "device", "batch_size", "dtype", "max_new_tokens", "allow_download", "max_batch_size")


class TokenPrune(lmms):
    """lmms-eval's ``simple`` model interface (``generate_until``) over a tokenprune-reduced VLM."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        allow_download: bool = False,
        max_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        import tokenprune
        from tokenprune.measure.models import load_vlm, parse_model

        spec = parse_model(str(pretrained), bool(allow_download))
        if spec.task != "vqa":
            raise ValueError(
                f"{pretrained!r} is a {spec.task} model; the lmms-eval plugin takes vision-language models"
            )
        loaded = load_vlm(spec, dtype=dtype)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            from accelerate import Accelerator

            accelerator = Accelerator()
            if accelerator.num_processes > 1:  # one replica per process; lmms-eval shards the requests
                self.accelerator = accelerator  # lmms-eval gathers and waits through it
                self._device = torch.device(f"cuda:{accelerator.local_process_index}")
                self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        except ImportError:
            pass
        self.model = loaded.model.to(self._device)
        self.processor = loaded.processor
        self.prompt_style = loaded.extra["prompt"]
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else loaded.extra["max_new_tokens"]
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.method = method
        self.patch = None if method == "none" else tokenprune.apply(self.model, method, **options)
        self.options = options

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _rows(self, requests: Sequence[Instance]) -> list[dict[str, Any]]:
        rows = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            if any(not hasattr(v, "convert") for v in visuals):
                raise ValueError(
                    f"task {task!r} gives non-image inputs (video/audio); the tokenprune model takes images"
                )
            images = [v.convert("RGB") for v in visuals]
            prompt = prompt_text(self.processor, context, self.prompt_style, images=len(images))
            rows.append({"index": doc_id, "question": context, "prompt": prompt, "pil": images})
        return rows

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, requests grouped by their generation options (in request order)."""
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("the tokenprune lmms-eval model decodes greedily; this task asks for sampling")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            rows = self._rows([requests[i] for i in indices])
            got = generate_answers(
                self.model, self.processor, rows, self.batch_size_per_gpu,
                int(kwargs.get("max_new_tokens") or self.max_new_tokens), until, progress=self.rank == 0,
            )  # fmt: skip
            for i, answer in zip(indices, got, strict=True):
                answers[i] = answer
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the tokenprune lmms-eval model generates answers (generate_until tasks only)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenprune lmms-eval model answers single-round tasks only")
