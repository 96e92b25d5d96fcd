"""``tokenprune bench`` on a vision-language model: time to first token, decode tokens/s, KV-cache bytes after
prefill and peak memory, patched vs unpatched in one run (a tiny random LLaVA saved to a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenprune
from tests.test_eval_any_model import tiny_llava_dir
from tokenprune.cli import main
from tokenprune.measure import generation
from tokenprune.measure.models import load_vlm, parse_model


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return tiny_llava_dir(tmp_path_factory.mktemp("llava"))


def test_kv_cache_bytes_are_the_sum_over_layers_of_each_layers_tokens(llava: Path):
    loaded = load_vlm(parse_model(str(llava)))
    model, text = loaded.model, loaded.model.config.text_config
    inputs, _ = generation.bench_inputs(loaded, None, batch_size=2)
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # K and V, fp32
    with torch.inference_mode():
        cache = generation.prefill_cache(model(**inputs, use_cache=True))
    length = inputs["input_ids"].shape[1]
    assert generation.kv_cache_bytes(cache) == text.num_hidden_layers * 2 * length * per_token
    patch = tokenprune.apply(model, "fastv", k=1, keep=0.5)
    with torch.inference_mode():
        cache = generation.prefill_cache(model(**inputs, use_cache=True))
    entering = [tokens_in for tokens_in, _ in patch.state.tokens_per_layer()]  # per layer, what it computed on
    patch.remove()
    assert entering[1] < entering[0] == length
    assert generation.kv_cache_bytes(cache) == 2 * sum(entering) * per_token
    result = generation.compare_generation(model, inputs, "fastv", {"k": 1, "keep": 0.5}, new_tokens=3, rounds=1)
    assert result["kv_cache_bytes_patched"] == 2 * sum(entering) * per_token
    assert result["kv_cache_bytes_unpatched"] == text.num_hidden_layers * 2 * length * per_token


def test_bench_cli_reports_generation_side_by_side(llava: Path, tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--model", str(llava), "--method", "fastv", "--set", "k=1", "--set", "keep=0.5",
          "--new-tokens", "4", "--rounds", "2", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    for kind in ("unpatched", "patched"):
        assert result[f"ttft_ms_{kind}"] > 0 and result[f"decode_tokens_per_s_{kind}"] > 0
        assert len(result[f"seconds_{kind}"]) == 2
        peak = result[f"peak_memory_mib_{kind}"]
        assert peak > 0 if Path("/proc/self/clear_refs").exists() else peak is None  # Linux: a fresh process each
    assert result["kv_cache_ratio"] < 1 and result["new_tokens"] == 4 and result["batch_size"] == 1
    table = capsys.readouterr().out
    assert "| unpatched |" in table and "| patched |" in table and "decode tokens/s" in table
    assert "fastv k=1 keep=0.5" in table
