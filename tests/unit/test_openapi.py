"""The OpenAPI document stays honest: it is valid OpenAPI 3.1, names exactly
the routes the app serves, describes exactly the request bodies the parser
accepts and the error body the handlers write, and is served without a key."""

from __future__ import annotations

import json
import re
import typing
from typing import Any, Literal

import attrs
import hypothesis
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from server.core.events import CancelReason, RunStatus
from server.settings import Settings
from server.web.app import create_app
from server.web.errors import _ENGINE_ERRORS, _HTTP_CODES, ApiError
from server.web.openapi import openapi_document
from server.web.requests import (
    SESSION_ID_PATTERN,
    ChatMessage,
    ChatRequest,
    StreamOptions,
    TextPart,
    parse_chat_request,
)
from tests.fuzz.strategies import LIKELY_MISTAKES, PATHS_INTO_BODY, chat_bodies, replace_at

DOCUMENT = openapi_document()
SCHEMAS = DOCUMENT["components"]["schemas"]
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}  # answered by Quart for every route


def validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}
    )


def test_document_is_valid_openapi_3_1() -> None:
    OPENAPI_31_VALIDATOR.validate(DOCUMENT)


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    app = create_app(Settings(data_dir=""))
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in IMPLICIT_METHODS
    }
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served - documented == set(), "routes missing from server/web/openapi.py"
    assert documented - served == set(), "documented routes the app does not serve"


def test_path_parameters_match_the_route_arguments() -> None:
    for path, item in DOCUMENT["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for operation in item.values():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, path


def properties(cls: type) -> dict[str, Any]:
    schema = SCHEMAS[cls.__name__]
    return {
        "names": set(schema["properties"]),
        "required": set(schema.get("required", [])),
    }


@pytest.mark.parametrize("cls", [ChatRequest, ChatMessage, StreamOptions, TextPart])
def test_request_schemas_name_the_parser_fields(cls: type) -> None:
    fields = attrs.fields(cls)
    assert properties(cls) == {
        "names": {field.name for field in fields},
        "required": {field.name for field in fields if field.default is attrs.NOTHING},
    }


@pytest.mark.parametrize("name", ["stream_format", "on_disconnect", "on_conflict"])
def test_request_enums_are_the_parser_literals(name: str) -> None:
    annotation = typing.get_type_hints(ChatRequest)[name]
    literals = [
        arg
        for candidate in (typing.get_args(annotation) or (annotation,))
        for arg in (
            typing.get_args(candidate) if typing.get_origin(candidate) is Literal else [candidate]
        )
    ]
    choices = [None if value is type(None) else value for value in literals]
    assert SCHEMAS["ChatRequest"]["properties"][name]["enum"] == choices


def test_session_id_schema_is_the_parser_pattern() -> None:
    parameters = DOCUMENT["paths"]["/v1/chat/completions"]["post"]["parameters"]
    (session,) = [p for p in parameters if p["name"] == "X-Session-Id"]
    assert session["schema"]["pattern"] == f"^{SESSION_ID_PATTERN.pattern}$"


def test_run_status_and_cancel_reasons_are_the_engine_enums() -> None:
    assert SCHEMAS["Run"]["properties"]["status"]["enum"] == [s.value for s in RunStatus]
    assert SCHEMAS["NativeEvent"]["properties"]["reason"]["enum"] == [r.value for r in CancelReason]


CHAT_REQUEST = validator("ChatRequest")


@hypothesis.settings(max_examples=400, derandomize=True, database=None, deadline=None)
@hypothesis.given(body=chat_bodies())
def test_chat_request_schema_accepts_exactly_what_the_parser_accepts(body: dict[str, Any]) -> None:
    assert CHAT_REQUEST.is_valid(body) == parses(body), body


# Every field present, every one of them valid.
FULL_BODY = {
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "prompt": "hi",
    "model": "m",
    "stream": True,
    "stream_options": {"include_usage": True},
    "stream_format": "events",
    "on_disconnect": "continue",
    "on_conflict": "reject",
}


def parses(body: Any) -> bool:
    try:
        parse_chat_request(json.dumps(body).encode())
    except ApiError as error:
        assert error.code == "invalid_request"
        return False
    return True


@pytest.mark.parametrize("path", PATHS_INTO_BODY, ids=str)
def test_chat_request_schema_and_parser_agree_on_each_likely_mistake(
    path: tuple[str | int, ...],
) -> None:
    for value in LIKELY_MISTAKES:
        body = replace_at(FULL_BODY, path, value)
        assert CHAT_REQUEST.is_valid(body) == parses(body), body


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"prompt": "hi"}, True),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, True),
        ({"prompt": "hi", "stream": None}, False),
        ({"prompt": "hi", "stream": 1}, False),
        ({"messages": [{"content": "hi"}]}, False),
        ({"prompt": "hi", "on_conflict": "later"}, False),
    ],
)
def test_chat_request_schema_examples(body: dict[str, Any], valid: bool) -> None:
    # The property above, on cases it must not miss.
    assert CHAT_REQUEST.is_valid(body) is valid


def test_every_error_code_fits_the_error_schema() -> None:
    error = validator("Error")
    codes = [code for code, _ in _HTTP_CODES.values()]
    codes += [code for _, code, _, _ in _ENGINE_ERRORS.values()]
    messages = [message for _, message in _HTTP_CODES.values()]
    for code, message in zip(codes, messages + ["m"] * len(codes), strict=False):
        error.validate({"error": {"code": code, "message": message}})
    assert not error.is_valid({"error": {"code": "x"}})
    assert not error.is_valid({"detail": "x"})


def test_engine_refusals_are_documented_on_chat_completions() -> None:
    responses = DOCUMENT["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status, _, _, headers in _ENGINE_ERRORS.values():
        assert str(status) in responses
        if "Retry-After" in headers:
            assert "Retry-After" in responses[str(status)]["headers"]


async def test_the_document_is_served_without_a_key() -> None:
    app = create_app(Settings(data_dir=""))
    async with app.test_app():
        response = await app.test_client().get("/openapi.json")
        assert response.status_code == 200
        assert response.content_type == "application/json"
        assert await response.get_json() == DOCUMENT
