"""Property: whatever the weights, the engine never emits a token illegal at its place."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from voxlane.server.engine import SamplingParams, Voice
from voxlane.server.engine.core import Request
from voxlane.server.orpheus import (
    AUDIO_TOKEN_BASE,
    END_OF_AI,
    END_OF_SPEECH,
    START_OF_AI,
    START_OF_SPEECH,
    VOCAB_SIZE,
    audio_token_range,
    tokens_to_frames,
)


@pytest.fixture(scope="module")
def steerable_model() -> LlamaForCausalLM:
    """A 1-layer random LM whose final hidden state is ~ +8 * e0 (a huge MLP bias on dim 0),
    so the logit of token t is ~ 8 * W[t, 0]: writing column 0 of the head steers it."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.bias.zero_()
        model.model.layers[0].mlp.down_proj.bias[0] = 1000.0
    return model


CONTROL = [START_OF_AI, START_OF_SPEECH, END_OF_AI, 128000, 128009, 128259, 128260, 128263]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    weight_seed=st.integers(0, 2**31 - 1),
    boosted=st.lists(
        st.one_of(
            st.sampled_from(CONTROL),
            st.integers(0, 128255),  # text tokens
            st.integers(AUDIO_TOKEN_BASE, VOCAB_SIZE - 1),  # audio tokens of any position
        ),
        min_size=1,
        max_size=40,
    ),
    boost_eos=st.booleans(),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_p=st.floats(0.05, 1.0),
    penalty=st.floats(1.0, 2.0),
    max_frames=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_only_legal_tokens_whatever_the_weights(
    kit,
    steerable_model,
    weight_seed,
    boosted,
    boost_eos,
    temperature,
    top_p,
    penalty,
    max_frames,
    seed,
) -> None:
    head = steerable_model.lm_head.weight
    saved = head[:, 0].clone()
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(weight_seed)
            head[:, 0] = torch.randn(head.shape[0], generator=gen)
            head[boosted, 0] = 100.0  # logit ~800: an unconstrained sampler would pick these
            head[END_OF_SPEECH, 0] = 200.0 if boost_eos else -100.0  # above any boost
        core = kit.make_core(steerable_model, max_context=512)
        state = core.new_session(Voice.builtin("tara"), window_segments=1)
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=penalty,
            max_frames=max_frames,
            seed=seed,
        )
        for text in ("one", "two", "three"):
            sink = kit.Sink()
            req = Request(id=core.next_id(), session=state, text=text, params=params, emit=sink)
            core.add_request(req)
            kit.run_until_done(core, req)
            # The steering works: unconstrained, the model would emit a boosted (illegal) token.
            full = req.prefill_hidden @ head.T
            assert int(full.argmax()) in {*boosted, END_OF_SPEECH}
            segment = state.tokens[req.start + len(req.prompt) :]
            assert segment[-2:] == [END_OF_SPEECH, END_OF_AI]
            audio = segment[:-2]
            assert len(audio) % 7 == 0 and len(audio) >= 7
            for i, token in enumerate(audio):
                assert token in audio_token_range(i % 7)
            assert tokens_to_frames(audio) == sink.frames
            if boost_eos:  # EOS as soon as it is legal: after exactly one frame
                assert len(sink.frames) == 1
                assert sink.finished.reason == ("eos" if max_frames > 1 else "max_frames")
            else:
                assert len(sink.frames) == max_frames and sink.finished.reason == "max_frames"
    finally:
        with torch.no_grad():
            head[:, 0] = saved
