"""The engine on the real loader and the Orpheus-shaped demo checkpoint (tokenizer included)."""

from __future__ import annotations

import torch

from voxlane.server.engine import EngineConfig, SamplingParams, SpeechEngine
from voxlane.server.engine.model import StepModel
from voxlane.server.orpheus import finetuned_prompt


async def test_demo_lm_forward_matches_hf_and_engine_speaks(demo_lm_tiny_dir) -> None:
    engine = SpeechEngine.from_pretrained(
        str(demo_lm_tiny_dir), config=EngineConfig(max_context=512, num_threads=1)
    )
    lm = engine.lm
    tokens = finetuned_prompt(lm.encode, "tara", "Hello there, how are you today?")
    sm = StepModel(lm.model)
    cache = sm.new_cache(64)
    ours = sm.forward(cache, torch.tensor([tokens])) @ sm.head_weight.T
    with torch.no_grad():
        ref = lm.model(torch.tensor([tokens])).logits
    assert (ours - ref).abs().max().item() <= 1e-4

    engine.start()
    try:
        voice = await engine.clone_voice("Hello.", [(1, 2, 3, 4, 5, 6, 7)] * 5)
        session = engine.open_session(voice)
        stream = session.generate("Hi!", SamplingParams(max_frames=3, seed=1))
        assert len([f async for f in stream]) == 3
        session.close()
    finally:
        await engine.aclose()
