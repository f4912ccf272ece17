"""Every request and response body of the service. Field limits here are hard caps (what the code handles);
the configured, usually tighter, limits are checked by the service (`ServiceConfig.max_*`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from loramint.gen.minter import MAX_DESCRIPTION_CHARS, MAX_EXAMPLES


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (e.g. \\ud800): send valid Unicode") from None
    return text


Unicode = Annotated[str, AfterValidator(_unicode)]
"""Text a tokenizer can take. Pydantic let lone surrogates ("\\ud800" in JSON) through into plain `str` fields
(constrained ones refuse them) and the tokenizer failed with a TypeError: HTTP 500, found by fuzzing."""
Text = Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)]
Example = Annotated[str, Field(min_length=1, max_length=64_000)]
Id = Annotated[str, Field(min_length=1, max_length=128)]


# ---- adapters and experts ---------------------------------------------------------------------------------
class SolvedExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Example = Field(description="What the model reads.")
    output: Example = Field(description="The answer it should give.")

    def text(self) -> str:
        return f"{self.input}\n{self.output}"


class MintRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: Text = Field(description="What the task asks for, in a sentence or a paragraph.")
    examples: list[Example | SolvedExample] | None = Field(
        None,
        max_length=MAX_EXAMPLES,
        description="A few examples to condition on: texts, or solved examples {input, output}. With solved "
        "examples the minted adapter is also checked on them against the base model, and the base model is "
        "served instead when the adapter does not do better (`fell_back`).",
    )
    rank: StrictInt | None = Field(
        None, ge=1, le=256, description="Keep only the strongest `rank` components."
    )
    store: StrictBool | None = Field(
        None,
        description="Where the adapter is kept: by default (null) on disk until it expires, counted to your "
        "key's storage quota; true: in the expert library (retrievable, no expiry); false: in memory only "
        "(ephemeral: gone at a restart or when newer ones push it out).",
    )
    id: Id | None = Field(None, description="The adapter's id (default: minted-<content hash>).")
    name: str | None = Field(None, max_length=200, description="Library name (default: the id).")
    family: str = Field("minted", max_length=128, description="Library family of a stored adapter.")

    def example_texts(self) -> list[str]:
        """Every example as the text the generator conditions on."""
        return [e if isinstance(e, str) else e.text() for e in self.examples or []]

    def solved(self) -> list[tuple[str, str]]:
        """The solved examples as (input, output) pairs: what the minted adapter is checked on."""
        return [(e.input, e.output) for e in self.examples or [] if isinstance(e, SolvedExample)]


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    stored: bool = Field(description="Whether it is in the expert library (retrievable, no expiry).")
    kept: bool = Field(False, description="A minted adapter kept on disk until `expires_at`.")
    expires_at: int | None = Field(None, description="Unix time a kept minted adapter is deleted at.")
    name: str
    description: str
    family: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    num_modules: int
    nbytes: int
    content_hash: str
    created: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    download_url: str | None = Field(description="Where to download it; null when the mint fell back.")
    fell_back: bool = Field(
        False,
        description="True when no adapter fits the task: `id` is then the base model's (use it as the "
        "completion `model`) and `metrics.minted.fallback_reason` says why.",
    )


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: Text
    k: int = Field(5, ge=1, le=100)
    family: str | None = Field(None, max_length=128)


class RetrievedExpert(AdapterInfo):
    score: float = Field(description="Cosine similarity of the descriptions' embeddings.")


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[RetrievedExpert]


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    offset: int
    limit: int
    total: int
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: Literal["expert"] = "expert"
    deleted: bool = True


# ---- OpenAI-compatible -------------------------------------------------------------------------------------
StopText = Annotated[Unicode, Field(min_length=1, max_length=256)]
"""Not empty: every text contains "", so an empty stop sequence cut every answer to nothing."""
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
MODEL_HELP = 'An adapter id, "auto" (the library\'s nearest experts to the prompt, mixed) or the base model.'
SAMPLING_HELP = "Accepted for compatibility; the runtime decodes greedily."


def _one_choice(n: int) -> int:
    if n != 1:
        raise ValueError(
            f"n is {n}, it must be 1: decoding is greedy, so every further choice would repeat the first"
        )
    return n


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    model: str = Field(max_length=1000, description=MODEL_HELP)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description=SAMPLING_HELP)
    top_p: float | None = Field(None, gt=0, le=1, description=SAMPLING_HELP)
    n: Annotated[int, AfterValidator(_one_choice)] = Field(
        1,
        ge=1,
        json_schema_extra={"maximum": 1},
        description="Must be 1: decoding is greedy, so a second choice would repeat the first.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="Up to 4 sequences; the text ends before the first one.")
    seed: int | None = Field(None, description=SAMPLING_HELP)
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_Generation):
    prompt: (
        Annotated[str, Field(max_length=1_000_000)]
        | Annotated[list[Annotated[str, Field(max_length=1_000_000)]], Field(min_length=1, max_length=16)]
    )
    echo: Literal[False] = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Unicode


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Unicode | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    route: dict[str, float] | None = Field(None, description="The experts and weights that served it.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    route: dict[str, float] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """vLLM's shape: the base model has `root` = its own id and no parent; an adapter names its base model
    as `parent` and its own id as `root`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loramint"
    root: str
    parent: str | None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors ------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and what to do.")
    type: str = Field(description="The error's class, e.g. NotFoundError, RequestValidationError.")
    code: int = Field(description="The HTTP status.")
    detail: list[dict[str, Any]] | None = Field(None, description="Every validation error (422 only).")


class ErrorResponse(BaseModel):
    """OpenAI's error shape, so OpenAI clients show the message."""

    error: ErrorDetail


# ---- operations --------------------------------------------------------------------------------------------
class Limits(BaseModel):
    """What this server accepts (its configuration); requests over a limit get a 4xx naming it."""

    max_description_chars: int = Field(description="A task description (mint, retrieve, upload).")
    max_examples: int = Field(description="Example texts per mint request.")
    max_example_chars: int = Field(description="One example text.")
    max_prompt_chars: int = Field(description="A completion prompt, or a chat request's messages together.")
    max_tokens: int = Field(description="The largest `max_tokens` a completion may ask for.")
    max_rank: int = Field(
        description="The highest LoRA rank served (uploads and mints above it are refused)."
    )
    max_body_bytes: int = Field(description="A request body other than an upload (HTTP 413 above).")
    max_upload_bytes: int = Field(description="An uploaded adapter zip (HTTP 413 above).")
    max_unzipped_bytes: int = Field(description="An upload's members together, decompressed.")
    max_minted: int = Field(
        description="Minted adapters held in memory with `store: false` (least recent dropped)."
    )
    minted_ttl_hours: int = Field(description="How long a kept minted adapter lives before it is deleted.")
    minted_quota_mb: int = Field(description="Disk per API key for kept minted adapters (HTTP 429 over it).")
    queue_size: int = Field(description="Requests waiting per work queue; one more gets HTTP 429.")
    mint_per_minute: int = Field(
        description="Mint requests a minute per API key; one more gets HTTP 429 with Retry-After."
    )
    upload_per_minute: int = Field(
        description="Expert uploads a minute per API key; one more gets HTTP 429 with Retry-After."
    )


class RuntimeHealth(BaseModel):
    resident: int = Field(description="Adapters resident in the runtime's stack.")
    capacity: int
    free_slots: int
    slots_accounted: bool = Field(description="Every slot is free or held by one resident adapter (no leak).")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(description='"degraded" (HTTP 503) names its `problems`.')
    problems: list[str] = Field(default_factory=list)
    base_model: str
    experts: int
    minted: int
    generator: bool
    queues: dict[str, int]
    workers: dict[str, bool] = Field(description="Whether each work queue's worker is running.")
    runtime: RuntimeHealth
