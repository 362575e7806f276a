"""The Generator interface: the extractive generator, a remote
GenerationService and Triton all stream the same events; and the events of
an Ask built on them (citations, deltas, the finish), which the pipeline
yields and the client returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rag_grpc.documents import Hit
from rag_grpc.errors import InvalidArgument

MAX_PROMPT_BYTES = 16 * 1024
MAX_STOP_SEQUENCES = 8
MAX_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class Passage:
    """A context passage, cited as [n] by its 1-based position."""

    document_id: str
    chunk_id: str
    text: str
    score: float = 0.0


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and length controls; zero means the generator's default."""

    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """The next piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Last event of a generation."""

    usage: Usage
    generator: str
    finish_reason: str
    cited_passages: tuple[int, ...] = field(default_factory=tuple)


GenerationEvent = Delta | Finished


# -- the events of an Ask (RagPipeline.ask, RagClient.ask) --------------------


@dataclass(frozen=True)
class AskTimings:
    """Milliseconds per stage of one Ask."""

    embed_ms: float
    retrieve_ms: float
    generate_ms: float
    first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Citations:
    """First event of an Ask: the passages the answer may cite, numbered from 1."""

    hits: list[Hit]


@dataclass(frozen=True)
class AskFinished:
    """Last event of an Ask."""

    finished: Finished
    timings: AskTimings
    cited: tuple[int, ...] = field(default_factory=tuple)
    # The answer came from the answer cache (same question, passages and generation).
    cached: bool = False

    @property
    def usage(self) -> Usage:
        """Tokens the generation took (its Finished's)."""
        return self.finished.usage

    @property
    def generator(self) -> str:
        """The generator that answered, e.g. "extractive"."""
        return self.finished.generator

    @property
    def finish_reason(self) -> str:
        """Why the generation stopped, e.g. "stop" or "length"."""
        return self.finished.finish_reason


AskEvent = Citations | Delta | AskFinished


class Generator(Protocol):
    """Streams an answer to a prompt grounded in passages."""

    name: str

    def generate(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """Deltas, then exactly one Finished."""
        ...


def require_context(passages: Sequence[Passage], why: str = "") -> None:
    """A generator answers from context: InvalidArgument without a passage
    (`why`, if given, opens the message)."""
    if not passages:
        raise InvalidArgument(
            f"{why}give at least one context passage (or call RagService.Ask, which retrieves them)"
        )


def validate_generation(prompt: str, params: GenerationParams) -> None:
    """Checks shared by every generator: prompt size and parameter ranges."""
    if not prompt.strip():
        raise InvalidArgument("prompt is empty")
    if len(prompt.encode("utf-8", errors="surrogatepass")) > MAX_PROMPT_BYTES:
        raise InvalidArgument(f"prompt is over {MAX_PROMPT_BYTES} bytes; shorten it")
    if params.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidArgument(
            f"max_tokens must be at most {MAX_TOKENS_LIMIT}, got {params.max_tokens}"
        )
    if not 0.0 <= params.temperature <= 2.0:
        raise InvalidArgument(f"temperature must be between 0 and 2, got {params.temperature}")
    if not 0.0 <= params.top_p <= 1.0:
        raise InvalidArgument(f"top_p must be between 0 and 1, got {params.top_p}")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(params.stop)}"
        )


def validate_context(passages: Sequence[Passage], max_passages: int, max_bytes: int) -> None:
    """A Generate request's context: at most max_passages passages and
    max_bytes of text in all (the generator reads every byte of it)."""
    if len(passages) > max_passages:
        raise InvalidArgument(
            f"{len(passages)} context passages; at most {max_passages} "
            "(limits.max_generate_passages)"
        )
    size = sum(len(p.text.encode("utf-8", errors="surrogatepass")) for p in passages)
    if size > max_bytes:
        raise InvalidArgument(
            f"the context is {size} bytes; at most {max_bytes} (limits.max_generate_context_bytes)"
        )
