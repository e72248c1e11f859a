"""Request and response bodies: what the routes accept and answer, and the OpenAPI document.

Request models are built per app (:func:`request_models`) so their limits (``maxItems`` = the
server's ``--max-inputs``) are the server's. Response models only document (the routes render
their JSON themselves, off the event loop when large); schemathesis checks responses against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .config import ServerConfig

Text = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
InputType = Optional[Literal["query", "passage", "raw"]]
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
Dimensions = Optional[Annotated[StrictInt, Field(ge=1, le=1 << 16)]]
INPUT_SHAPE_MSG = ("must be a non-empty string, a list of non-empty strings, a list of token ids or a list of "
                   "lists of token ids")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True)
class RequestModels:
    embeddings: type[BaseModel]
    embed: type[BaseModel]
    similarity: type[BaseModel]
    tokenize: type[BaseModel]


def request_models(config: ServerConfig) -> RequestModels:
    """The request bodies with this server's limits."""
    n = config.max_inputs
    Inputs = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=n)], TokenIds,
                   Annotated[list[TokenIds], Field(min_length=1, max_length=n)]]
    Texts = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=n)]]
    Task = Optional[Annotated[StrictStr, Field(min_length=1, description="Task name or instruction (instruct models).")]]

    class EmbeddingsRequest(_Body):
        """OpenAI's embeddings request, plus E5's `input_type`, `task` and `truncate`."""

        input: Inputs = Field(description=f"Text, texts (1..{n}), token ids, or lists of token ids.")
        model: Optional[StrictStr] = Field(None, description="A served model id (default: the first one).")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: Dimensions = Field(None, description="Keep the first N dimensions, re-normalised.")
        user: Optional[StrictStr] = None
        input_type: InputType = Field(None, description="query, passage or raw (default: the server's).")
        task: Task = None
        truncate: Optional[StrictBool] = Field(None, description="Cut over-long inputs (default: the server's).")

    class EmbedRequest(_Body):
        """Native embedding request (TEI-style)."""

        inputs: Inputs
        model: Optional[StrictStr] = None
        normalize: StrictBool = True
        truncate: Optional[StrictBool] = None
        input_type: InputType = None
        task: Task = None
        dimensions: Dimensions = None
        precision: Precision = "float32"
        long: Literal["truncate", "mean", "chunks"] = Field(
            "truncate", description="Passages over the token limit: truncate them (see `truncate`), one vector per "
            "input = the normalised mean of its chunks' vectors (`mean`), or every chunk's vector with its character "
            "span (`chunks`). `mean` and `chunks` need texts embedded as passages.")
        chunk_overlap: Annotated[StrictInt, Field(ge=0, le=256)] = Field(
            64, description="With long=mean/chunks: tokens shared by neighbouring chunks.")

    class SimilarityRequest(_Body):
        """One query against passages: cosine x 100 and the ranking, as on the model cards."""

        query: Text
        passages: Annotated[list[Text], Field(min_length=1, max_length=n - 1)]
        model: Optional[StrictStr] = None
        task: Task = None
        query_type: Literal["query", "passage", "raw"] = "query"
        passage_type: Literal["query", "passage", "raw"] = "passage"
        truncate: Optional[StrictBool] = None

    class TokenizeRequest(_Body):
        """Texts to format and tokenize exactly as the embedding routes do."""

        inputs: Texts
        model: Optional[StrictStr] = None
        input_type: InputType = None
        task: Task = None
        truncate: Optional[StrictBool] = None

    return RequestModels(EmbeddingsRequest, EmbedRequest, SimilarityRequest, TokenizeRequest)


# ---- responses (documentation and schema checks) -------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str] = Field(description="floats, or base64 of little-endian float32")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ChunkEmbedding(BaseModel):
    """One chunk of an input embedded with ``long="chunks"``."""

    span: Annotated[list[int], Field(min_length=2, max_length=2,
                                     description="[start, end) character offsets of the chunk in its input")]
    embedding: list[float]


EMBED_RESPONSE = {
    "description": "One vector per input; with long=chunks, per input the list of its chunks, in order",
    "content": {"application/json": {"schema": {"type": "array", "items": {"anyOf": [
        {"type": "array", "items": {"type": "number"}},
        {"type": "array", "items": ChunkEmbedding.model_json_schema()}]}}}},
}


class RankedPassage(BaseModel):
    index: int
    score: float


class SimilarityResponse(BaseModel):
    object: Literal["similarity"]
    model: str
    scores: list[float]
    ranking: list[RankedPassage]
    usage: Usage


class Token(BaseModel):
    id: int
    text: str
    start: int
    stop: int
    special: bool


class TokenizedText(BaseModel):
    index: int
    text: str = Field(description="The exact string the model sees (prefix applied).")
    truncated: bool
    tokens: list[Token]


class TokenizeResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[TokenizedText]


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    dimensions: int
    max_tokens: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class UsageReport(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["usage"]
    key: str
    requests: int
    inputs: int
    total_tokens: int
    cost_usd: float


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    models: list[str]


def error_doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses (all in :class:`ErrorBody` shape)."""
    why = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown model or route",
           408: "The request was not received in time", 413: "Body too large", 415: "Not JSON",
           422: "Invalid request (native routes)", 429: "Busy: retry after Retry-After seconds",
           503: "Starting, draining or shutting down"}
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": why[s]}
        if s in (429, 503):
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        out[s] = entry
    return out


def body_doc(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that parses its body itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(schema)}}}}


def _inline(schema: dict) -> dict:
    """Resolve a pydantic schema's local ``$defs`` so it can sit in an operation on its own."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/") and ref.split("/")[-1] in defs:
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


__all__ = ["request_models", "RequestModels", "TokenId", "ErrorBody", "EmbeddingsResponse", "ChunkEmbedding",
           "EMBED_RESPONSE", "SimilarityResponse", "TokenizeResponse", "ModelList", "ModelCard", "UsageReport", "Health",
           "Ready", "error_doc", "body_doc", "INPUT_SHAPE_MSG"]
