"""The HTTP API against hostile and careless callers: a bearer token when the server has one, bodies of the
wrong type, size or content refused with a 4xx and a one-line detail, no 5xx for any request schemathesis
generates from the OpenAPI spec (with and without a token), and no error under concurrent load.

That `gda serve` binds 127.0.0.1 by default is tests/unit/test_api.py::test_serve_runs_the_app_on_loopback.
"""

from __future__ import annotations

import io
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from servicekit import ServedHome

from bench import Setting
from bench import load as load_bench
from gda import cli
from gda.api import UNAUTHORIZED, create_app
from gda.profiles import profile_values
from gda.service import AttributionEngine, open_engine

TOKEN = secrets.token_urlsafe(16)
# Requests per operation and generation mode (schema-valid, schema-violating), in each of 3 setups: about
# 400 in all, under a minute per setup even on a busy 2-core machine. An operation without input gets its
# one possible request.
EXAMPLES = 15


@pytest.fixture(scope="module")
def engine(served_home: ServedHome) -> Iterator[AttributionEngine]:
    # No audit log: fuzzed requests are not answers anyone gave, and the home is shared with tests/unit.
    with open_engine(served_home.home, "tiny") as engine:
        yield engine


@pytest.fixture(scope="module")
def open_client(engine: AttributionEngine) -> TestClient:
    return TestClient(create_app(engine))


@pytest.fixture(scope="module")
def locked_client(engine: AttributionEngine) -> TestClient:
    return TestClient(create_app(engine, token=TOKEN))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def data_requests(served_home: ServedHome) -> dict[str, dict]:
    """One valid request to each endpoint that reaches the data, as TestClient.request keyword arguments."""
    train_id, (query_id, prompt) = served_home.ids[0], next(iter(served_home.query_prompts.items()))
    upload = {
        "files": {"image": ("q.png", served_home.query_images[query_id], "image/png")},
        "data": {"prompt": prompt, "top_k": "3"},
    }
    return {
        "POST /attribute": upload,
        f"GET /training-images/{train_id}": {},
        f"GET /training-images/{train_id}/image": {},
        "GET /queries": {},
        f"GET /queries/{query_id}/image": {},
    }


def call(client: TestClient, endpoint: str, arguments: dict, headers: dict[str, str] | None = None):
    method, url = endpoint.split()
    return client.request(method, url, headers=headers, **arguments)


def test_with_a_token_the_data_needs_it(served_home: ServedHome, locked_client: TestClient) -> None:
    wrong = [
        None,
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {'é' * 8}".encode()},
    ]  # non-ASCII: compared as bytes, so refused, not a TypeError
    for endpoint, arguments in data_requests(served_home).items():
        for headers in wrong:
            response = call(locked_client, endpoint, arguments, headers)
            assert (response.status_code, response.json()) == (401, {"detail": UNAUTHORIZED}), (endpoint, headers)
            assert response.headers["www-authenticate"] == "Bearer"
        assert call(locked_client, endpoint, arguments, bearer(TOKEN)).status_code == 200, endpoint

    # /health stays open for liveness probes but, without the token, says only whether the engine answers.
    assert locked_client.get("/health").json() == {"status": "ok"}
    assert locked_client.get("/health", headers=bearer("wrong")).json() == {"status": "ok"}
    full = locked_client.get("/health", headers=bearer(TOKEN)).json()
    assert full["versions"]["index"] == served_home.index_version and full["indexed"] == len(served_home.ids)
    # The page is static and holds no data; it asks for the token when the API answers 401.
    page = locked_client.get("/")
    assert page.status_code == 200 and '<form id="token"' in page.text

    spec = locked_client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "the token the server was started with (GDA_API_TOKEN)",
        }
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            expected = [{"HTTPBearer": []}, {}] if path == "/health" else [{"HTTPBearer": []}]
            assert operation["security"] == expected, path


def test_without_a_token_nothing_asks_for_one(
    served_home: ServedHome, open_client: TestClient, engine: AttributionEngine
) -> None:
    for endpoint, arguments in data_requests(served_home).items():
        assert call(open_client, endpoint, arguments).status_code == 200, endpoint
        assert call(open_client, endpoint, arguments, bearer("anything")).status_code == 200, endpoint  # ignored
    assert "versions" in open_client.get("/health").json()
    spec = open_client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert all(
        "security" not in operation for operations in spec["paths"].values() for operation in operations.values()
    )
    for token in ("", " padded", "padded\n"):
        with pytest.raises(ValueError, match="empty or has surrounding whitespace"):
            create_app(engine, token=token)


def test_serve_takes_the_token_from_the_environment_only(
    served_home: ServedHome, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, int] = {}

    def fake_run(app: FastAPI, host: str, port: int) -> None:
        client = TestClient(app)
        seen.update(
            without=client.get("/queries").status_code,
            with_token=client.get("/queries", headers=bearer(TOKEN)).status_code,
        )

    monkeypatch.setattr(uvicorn, "run", fake_run)
    argv = ["serve", "--home", str(served_home.home.root), "--profile", "tiny"]
    monkeypatch.setenv("GDA_API_TOKEN", TOKEN)
    assert cli.main(argv) == 0
    assert seen == {"without": 401, "with_token": 200}
    with pytest.raises(SystemExit):
        cli.main([*argv, "--token", TOKEN])  # no such flag: a command line shows in `ps`
    capsys.readouterr()

    monkeypatch.setenv("GDA_API_TOKEN", "")
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("gda: the API token is empty")

    monkeypatch.delenv("GDA_API_TOKEN")
    assert cli.main([*argv, "--host", "0.0.0.0"]) == 0
    assert seen == {"without": 200, "with_token": 200}
    assert "serving on 0.0.0.0 without GDA_API_TOKEN" in capsys.readouterr().err


def png_of_noise(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_bodies_of_the_wrong_type_size_or_content_are_refused(
    served_home: ServedHome, engine: AttributionEngine
) -> None:
    client = TestClient(create_app(engine, max_upload_bytes=4000))
    image, prompt = png_of_noise(16), "a red square"
    assert len(image) < 4000

    def refused(response, status: int, detail: str) -> None:
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"]

    # A body that is not multipart/form-data: 415 naming the type, not a 422 about missing fields.
    for content_type, body in [
        ("application/json", b'{"prompt": "a red square"}'),
        ("text/plain", b"a red square"),
        ("application/x-www-form-urlencoded", b"prompt=a+red+square"),
        ("image/png", image),
    ]:
        refused(
            client.post("/attribute", content=body, headers={"content-type": content_type}),
            415,
            f"multipart/form-data, not {content_type}",
        )
    refused(client.post("/attribute", content=image), 415, "not a body without a content type")
    refused(
        client.post("/attribute", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, "boundary"
    )

    # The bytes decide what the image is, whatever type its part declares.
    truncated = image[: len(image) // 2]
    for data, declared in [
        (b"plain text", "text/plain"),
        (b"plain text", "image/png"),
        (truncated, "image/png"),
        (b"", "image/png"),
    ]:
        response = client.post("/attribute", files={"image": ("q.png", data, declared)}, data={"prompt": prompt})
        refused(response, 415, "not a decodable image")
    generic = client.post(
        "/attribute", files={"image": ("q", image, "application/octet-stream")}, data={"prompt": prompt}
    )
    assert generic.status_code == 200, generic.text
    not_a_file = client.post("/attribute", data={"image": "not a file", "prompt": prompt}, files={"other": ("x", b"x")})
    assert not_a_file.status_code == 422 and not_a_file.json()["detail"][0]["loc"] == ["body", "image"]

    # Over the upload limit: refused before it is read, even before the token is checked.
    big = png_of_noise(64)
    assert len(big) > 4000
    locked = TestClient(create_app(engine, max_upload_bytes=4000, token=TOKEN))
    for tested in (client, locked):
        refused(
            tested.post("/attribute", files={"image": ("q.png", big, "image/png")}, data={"prompt": prompt}),
            413,
            "over the upload limit of 4000 bytes",
        )
    refused(
        locked.post("/attribute", files={"image": ("q.png", image, "image/png")}, data={"prompt": prompt}),
        401,
        "needs its token",
    )


def fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, headers: dict[str, str], statuses: Counter[int]
) -> None:
    """EXAMPLES requests to `operation` generated in `mode` (derandomized), each with `headers`; counts the
    statuses and fails on any 5xx."""

    @settings(
        max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
        statuses[response.status_code] += 1

    check()


def fuzz(app: FastAPI, headers: dict[str, str]) -> dict[str, Counter[int]]:
    """Every operation of the app's OpenAPI spec called in process with schema-valid and (when it takes any
    input) schema-violating requests; the statuses seen per operation."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        seen[operation.label] = Counter()
        takes_input = any(
            map(len, (operation.path_parameters, operation.query, operation.headers, operation.cookies, operation.body))
        )
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,):
            fuzz_operation(operation, mode, headers, seen[operation.label])
    return seen


def test_no_request_from_the_spec_gets_a_5xx_without_a_token(open_client: TestClient) -> None:
    seen = fuzz(open_client.app, {})
    assert set(seen) == {
        "POST /attribute",
        "POST /attribute/batch",
        "GET /training-images/{train_id}",
        "GET /training-images/{train_id}/image",
        "GET /queries",
        "GET /queries/{query_id}/image",
        "GET /health",
    }
    assert all(status != 401 for statuses in seen.values() for status in statuses)
    assert {415, 422} <= set(seen["POST /attribute"])  # fuzzing reached the image decoding and the form checks


def test_no_request_from_the_spec_gets_a_5xx_with_a_token(locked_client: TestClient) -> None:
    authorized = fuzz(locked_client.app, bearer(TOKEN))
    # Schema-violating cases include ones where schemathesis drops the required Authorization header: 401.
    assert all(set(statuses) - {401} for statuses in authorized.values()), authorized
    assert {415, 422} <= set(authorized["POST /attribute"])

    unauthorized = fuzz(locked_client.app, {})
    assert set(unauthorized.pop("GET /health")) == {200}
    # FastAPI parses a body before it checks the token, so a malformed multipart body is a 400 first.
    assert set(unauthorized.pop("POST /attribute")) <= {400, 401}
    assert set(unauthorized.pop("POST /attribute/batch")) <= {400, 401}
    assert all(set(statuses) == {401} for statuses in unauthorized.values()), unauthorized


def test_the_load_benchmark_answers_every_request_and_finds_each_answer_logged_once(served_home: ServedHome) -> None:
    setting = Setting(served_home.home, "tiny", profile_values("tiny"), threads=1)
    result = load_bench.run(setting, rounds=(2, 6), seconds=3.0)
    assert [one["clients"] for one in result["rounds"]] == [2, 6]
    for one in result["rounds"]:
        assert one["errors"] == 0 and one["failures"] == {}
        assert one["requests"] == one["answered"] > 0 and one["statuses"] == {"200": one["requests"]}
        assert one["answers_logged_once"] == one["answered"] and one["answers_not_logged_once"] == 0
        assert one["p50_ms"] <= one["p95_ms"] <= one["p99_ms"]
        assert one["throughput_per_s"] == pytest.approx(one["answered"] / one["elapsed_s"])
        assert one["elapsed_s"] >= 3.0 and 1 <= one["mean_batch_size"] <= one["clients"]
