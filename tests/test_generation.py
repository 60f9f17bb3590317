"""Sampling through common.generation: one prompt's samples share its KV cache."""

from __future__ import annotations

from common.config import ModelConfig
from common.generation import render, sample
from common.lora import build_peft_model
from common.model import load_base_for, load_tokenizer
from common.personalization import get_strategy


def test_one_prompt_s_samples_share_its_kv_cache_and_match_separate_rows() -> None:
    # Prepare: the peft model (as the assistant serves it) and a rendered prompt.
    cfg = ModelConfig(name="tiny")
    model = build_peft_model(load_base_for(cfg), cfg, get_strategy("blend"))
    tok = load_tokenizer("tiny")
    prompt = render(tok, [{"role": "user", "content": "Tell me of the sea and the wind."}])

    # Execute: 3 samples of one prompt (one prefill, the cache repeated) and the same prompt
    # as 3 rows of a batch (3 prefills), from the same seed.
    shared = sample(model, tok, [prompt], n=3, max_new_tokens=12, seed=0)[0]
    separate = [row[0] for row in sample(model, tok, [prompt] * 3, n=1, max_new_tokens=12, seed=0)]

    # Assert: the same tokens, row by row.
    assert shared == separate
    assert len({g.text for g in shared}) > 1  # sampled, not one answer three times
