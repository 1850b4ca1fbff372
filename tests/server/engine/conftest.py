"""Fixtures of the engine tests: a tiny random Orpheus-shaped LM, fp32, one thread."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from voxlane.server.engine import EngineConfig
from voxlane.server.engine.core import EngineCore, Finished, Request
from voxlane.server.engine.model import StepModel
from voxlane.server.orpheus import START_OF_TEXT, VOCAB_SIZE

# The box is shared: one intra-op thread avoids OpenMP spinning against other processes.
torch.set_num_threads(1)


def tiny_llama(*, layers: int = 2, tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """Orpheus' architecture in miniature (Llama-3 RoPE scaling, theta 500k, GQA 4:2)."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def fake_encode(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: BOS + one id per byte (all plain text ids)."""
    return [START_OF_TEXT, *(b + 100 for b in text.encode())]


@dataclass
class FakeLM:
    """Quacks like voxlane.server.lm.SpeechLM for the engine."""

    model: LlamaForCausalLM

    def encode(self, text: str) -> list[int]:
        return fake_encode(text)


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_lm(tiny_model: LlamaForCausalLM) -> FakeLM:
    return FakeLM(tiny_model)


def _make_core(model: LlamaForCausalLM, **config: object) -> EngineCore:
    config.setdefault("max_context", 1024)
    cfg = EngineConfig(**config)  # type: ignore[arg-type]
    return EngineCore(StepModel(model, quantize=cfg.quantize), fake_encode, cfg)


class Sink:
    """Collects what a request emits (engine-thread side)."""

    def __init__(self) -> None:
        self.items: list[object] = []

    def __call__(self, item: object) -> None:
        self.items.append(item)

    @property
    def frames(self) -> list[tuple[int, ...]]:
        return [i for i in self.items if isinstance(i, tuple)]

    @property
    def finished(self) -> Finished | None:
        last = self.items[-1] if self.items else None
        return last if isinstance(last, Finished) else None

    @property
    def error(self) -> BaseException | None:
        last = self.items[-1] if self.items else None
        return last if isinstance(last, BaseException) else None


def _run_until_done(core: EngineCore, *reqs: Request, max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if all(r.done for r in reqs):
            return
        core.step()
    raise AssertionError("requests did not finish")


def _submit(core: EngineCore, state, text: str, **params: object) -> tuple[Request, Sink]:
    """Queue a segment on ``state`` (from the test's thread) and the sink collecting its output."""
    from voxlane.server.engine import SamplingParams

    sink = Sink()
    req = Request(
        id=core.next_id(), session=state, text=text, params=SamplingParams(**params), emit=sink
    )
    core.add_request(req)
    return req, sink


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """Helpers for driving an EngineCore synchronously (no thread)."""
    return SimpleNamespace(
        make_core=_make_core,
        Sink=Sink,
        submit=_submit,
        run_until_done=_run_until_done,
        tiny_llama=tiny_llama,
        encode=fake_encode,
        FakeLM=FakeLM,
    )
