"""The HTTP API over an `AttributionEngine` (FastAPI; `gda serve` runs it with uvicorn, OpenAPI at /docs), and
the attribution explorer page at / (gda/explorer.html: a gallery of the answer for an uploaded image or one
of the home's generated test queries, calling this API from the browser).

With a token (`gda serve` reads GDA_API_TOKEN), every endpoint that reaches the data needs it as
`Authorization: Bearer TOKEN`; the static page, the OpenAPI spec and its docs stay open. So does /health, for
liveness probes, which carry no credentials, but it tells a caller without the token only whether the engine
answers: its versions and index size are the deployment's own business.

Every refusal is a 4xx with a one-line `detail`: 401 without the token, 409 while the engine refuses (index
and embedder versions differ), 413 for a request body over the upload limit (enforced while the body is read,
and before reading when the declared length is already over) or an image over Pillow's pixel limit, 415 for
an /attribute body that is not multipart/form-data or an image part whose bytes are not an image (the bytes
decide, not the part's declared type, which clients often leave generic), 422 for an empty prompt or top_k
out of range, 404 for an unknown training or query id. `POST /attribute/batch` answers up to MAX_BATCH_ITEMS
images with their prompts in one request (413 above that): each item gets its answer or its own error with
the status /attribute would have given it, so one bad image does not fail the rest.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and they
# refer to the engine in create_app's scope.
import base64
import hmac
from collections.abc import Callable
from importlib.resources import files
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gda.service import AttributionEngine, ImageTooLarge, InvalidImage, Match, PreparedQuery, Refused, Versions

MiB = 1 << 20
MAX_BATCH_ITEMS = 64


class AttributeResponse(BaseModel):
    results: list[Match]
    versions: Versions
    image_sha256: str
    log_id: str  # the answer's attribution_log row
    batch_size: int  # requests answered in the same micro-batch
    timings_ms: dict[str, float]


class ItemError(BaseModel):
    status: int  # what /attribute would have answered for this item alone
    detail: str


class BatchItem(BaseModel):
    index: int  # position in the request's images and prompts
    answer: AttributeResponse | None
    error: ItemError | None


class BatchResponse(BaseModel):
    items: list[BatchItem]


class TrainingImageResponse(BaseModel):
    id: int
    shard: str
    key: str
    caption: str
    url: str | None
    license: str | None
    image_format: str
    media_type: str
    image_base64: str


class GeneratedQueryResponse(BaseModel):
    query_id: int
    prompt: str
    image_url: str  # where to GET its PNG


class Liveness(BaseModel):
    status: Literal["ok", "refusing"]


class Health(Liveness):
    detail: str | None  # why it refuses
    versions: Versions
    indexed: int
    max_top_k: int


class _BodyLimit:
    """413 for a request body over `limit` bytes: from the declared Content-Length before reading anything,
    otherwise (chunked uploads) as soon as the bytes read pass the limit, so nothing larger is buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.detail = f"request body over the upload limit of {limit} bytes ({limit / MiB:g} MiB)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        read = 0

        async def limited_receive() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                # FastAPI re-raises an HTTPException met while parsing a body, so this becomes a 413 answer.
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited_receive, send)


UNAUTHORIZED = "this API needs its token: send the header Authorization: Bearer TOKEN (the server's GDA_API_TOKEN)"


def _caller_check(token: str | None) -> Callable[..., bool]:
    """A dependency telling whether the caller may see the API's data: anyone without a token, otherwise only
    a caller sending it as a bearer token (declared in the OpenAPI spec as the HTTPBearer scheme)."""
    if token is None:

        def anyone() -> bool:
            return True

        return anyone
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="the token the server was started with (GDA_API_TOKEN)")

    def bearer_matches(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> bool:
        # compare_digest takes as long whatever the guess; on bytes, since on str it refuses non-ASCII text.
        return credentials is not None and hmac.compare_digest(credentials.credentials.encode(), expected)

    return bearer_matches


def _multipart_only(request: Request) -> None:
    """415 for an /attribute body of another type, which would otherwise read as a form missing its fields."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise HTTPException(
            415,
            f"send the image and prompt as multipart/form-data, not {media_type or 'a body without a content type'}",
        )


def _status(error: Exception) -> int:
    """The HTTP status of an engine's refusal of a request."""
    if isinstance(error, Refused):
        return 409
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, InvalidImage):
        return 415
    return 422


def create_app(engine: AttributionEngine, max_upload_bytes: int = 10 * MiB, token: str | None = None) -> FastAPI:
    """The API answering from `engine`, only to callers sending `token` as a bearer token when one is given;
    its answers are logged by the engine's audit log (interface 'http')."""
    if engine.audit is not None and engine.audit.interface != "http":
        raise ValueError(f"an HTTP API must log with interface 'http', not {engine.audit.interface!r}")
    if token is not None and (not token or token != token.strip()):
        # HTTP strips a header value's surrounding whitespace, so such a token could never be sent.
        raise ValueError(
            "the API token is empty or has surrounding whitespace: set GDA_API_TOKEN to the token clients send, "
            "or unset it"
        )
    app = FastAPI(
        title="gda attribution",
        description="Which training images most influenced an image generated by the diffusion model.",
    )
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)
    explorer_page = files("gda").joinpath("explorer.html").read_text(encoding="utf-8")
    authorized = _caller_check(token)

    def require_token(allowed: Annotated[bool, Depends(authorized)]) -> None:
        if not allowed:
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    # Everything the data is reached through; FastAPI parses a body before it runs dependencies, so an
    # unauthorized upload is still read, never past the upload limit.
    api = APIRouter(dependencies=[Depends(require_token)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def explorer() -> str:
        """The attribution explorer: pick a generated test query or upload an image, see its top-k gallery."""
        return explorer_page

    @api.post("/attribute", response_model=AttributeResponse, dependencies=[Depends(_multipart_only)])
    def attribute(
        image: Annotated[UploadFile, File(description="the generated image (PNG, JPEG, WEBP, ...)")],
        prompt: Annotated[str, Form(description="the prompt the image was generated from")],
        top_k: Annotated[int, Form(description=f"how many training images to return, 1 to {engine.max_top_k}")] = 10,
    ) -> dict:
        """The most influential training images, best first, with the versions that answered."""
        try:
            request = engine.prepare(image.file.read(), prompt, top_k)
            return engine.answer([request])[0].payload()
        except (Refused, ValueError) as error:
            raise HTTPException(_status(error), str(error)) from error

    @api.post("/attribute/batch", response_model=BatchResponse, dependencies=[Depends(_multipart_only)])
    def attribute_batch(
        images: Annotated[list[UploadFile], File(description=f"the generated images, at most {MAX_BATCH_ITEMS}")],
        prompts: Annotated[list[str], Form(description="their prompts, one per image, in the same order")],
        top_k: Annotated[int, Form(description="how many training images to return per image")] = 10,
    ) -> dict:
        """Many images at once (a platform's backfill): one answer or one error per item, in order; a bad
        item does not fail the others."""
        if len(images) != len(prompts):
            raise HTTPException(422, f"got {len(images)} images but {len(prompts)} prompts: send one prompt per image")
        if len(images) > MAX_BATCH_ITEMS:
            raise HTTPException(413, f"{len(images)} items in one batch; send at most {MAX_BATCH_ITEMS} per request")
        items: list[dict] = [{"index": i, "answer": None, "error": None} for i in range(len(images))]
        prepared: list[tuple[int, PreparedQuery]] = []
        for i, (upload, prompt) in enumerate(zip(images, prompts, strict=True)):
            try:
                prepared.append((i, engine.prepare(upload.file.read(), prompt, top_k)))
            except (Refused, ValueError) as error:
                items[i]["error"] = {"status": _status(error), "detail": str(error)}
        try:
            answers = engine.answer([request for _, request in prepared])
        except Refused as error:
            raise HTTPException(409, str(error)) from error
        for (i, _), answer in zip(prepared, answers, strict=True):
            items[i]["answer"] = answer.payload()
        return {"items": items}

    def _training_image(train_id: int) -> tuple[dict, bytes]:
        try:
            return engine.training_image(train_id)
        except KeyError as error:
            raise HTTPException(404, f"no training image with id {train_id}") from error
        except FileNotFoundError as error:
            raise HTTPException(503, str(error)) from error

    @api.get("/training-images/{train_id}", response_model=TrainingImageResponse)
    def training_image(train_id: int) -> dict:
        """A training image's metadata, with the image itself as base64."""
        metadata, data = _training_image(train_id)
        return {**metadata, "image_base64": base64.b64encode(data).decode("ascii")}

    @api.get("/training-images/{train_id}/image", response_class=Response)
    def training_image_bytes(train_id: int) -> Response:
        """The training image's bytes as stored in its shard."""
        metadata, data = _training_image(train_id)
        return Response(content=data, media_type=metadata["media_type"])

    @api.get("/queries", response_model=list[GeneratedQueryResponse])
    def generated_queries() -> list[dict]:
        """The home's generated test queries, in query order, to try the attribution on (none before generated)."""
        return [
            {
                "query_id": query.query_id,
                "prompt": query.prompt,
                "image_url": app.url_path_for("query_image", query_id=query.query_id),
            }
            for query in engine.test_queries.values()
        ]

    @api.get("/queries/{query_id}/image", response_class=Response)
    def query_image(query_id: int) -> Response:
        """The generated test query's PNG."""
        try:
            return Response(content=engine.query_image(query_id), media_type="image/png")
        except KeyError as error:
            raise HTTPException(404, f"no generated test query with id {query_id}") from error
        except FileNotFoundError as error:
            raise HTTPException(503, str(error)) from error

    # With a token, /health's security is optional: OpenAPI's empty requirement `{}` means "or none"
    # (FastAPI appends this list to the declared HTTPBearer requirement).
    @app.get("/health", response_model=Health | Liveness, openapi_extra={"security": [{}]} if token else None)
    def health(full: Annotated[bool, Depends(authorized)]) -> Health | Liveness:
        """Whether the engine answers; to a caller with the token (or to anyone when the server has none) also
        what it answers with and how many training images it searches."""
        refusal = engine.refusal
        status = "ok" if refusal is None else "refusing"
        if not full:
            return Liveness(status=status)
        return Health(
            status=status,
            detail=refusal,
            versions=engine.versions,
            indexed=engine.index.manifest.count,
            max_top_k=engine.max_top_k,
        )

    app.include_router(api)
    return app
