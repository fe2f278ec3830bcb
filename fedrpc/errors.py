"""Every error a client can see, and the one function that shapes them.

Application errors carry a stable ``data.type`` and a code outside the range
JSON-RPC reserves (-32768..-32000). The protocol errors (-32700..-32600) and
the catch-all -32603 use the same ``data`` shape so a client needs one parser.
"""

from __future__ import annotations

from typing import Any, ClassVar

# JSON-RPC 2.0 protocol codes, used only for what the specification says.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

PROTOCOL_MESSAGES = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
}


class AppError(Exception):
    """An error meant for the caller: its message and details are shown as they are.

    Only ever put our own words and our own identifiers in ``message`` and
    ``details``; never the text of another exception.
    """

    type: ClassVar[str] = "internal_error"
    code: ClassVar[int] = 4500
    http_status: ClassVar[int] = 200

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(AppError):
    type, code = "bad_request", 4400


class Unauthorized(AppError):
    type, code, http_status = "unauthorized", 4401, 401


class PrivacyBudgetExhausted(AppError):
    type, code = "privacy_budget_exhausted", 4402


class Forbidden(AppError):
    type, code = "forbidden", 4403


class NotFound(AppError):
    type, code = "not_found", 4404


class Conflict(AppError):
    type, code = "conflict", 4409


class PreconditionFailed(AppError):
    type, code = "precondition_failed", 4412


class PayloadTooLarge(AppError):
    type, code, http_status = "payload_too_large", 4413, 413


class RateLimited(AppError):
    type, code, http_status = "rate_limited", 4429, 429


class InternalError(AppError):
    """A failure we understand but the caller cannot fix (e.g. storage unreachable)."""

    type, code = "internal_error", 4500


APP_ERRORS: tuple[type[AppError], ...] = (
    BadRequest,
    Unauthorized,
    PrivacyBudgetExhausted,
    Forbidden,
    NotFound,
    Conflict,
    PreconditionFailed,
    PayloadTooLarge,
    RateLimited,
    InternalError,
)


def error_object(code: int, message: str, type_: str, request_id: str, **details: Any) -> dict:
    """The JSON-RPC ``error`` member: the only place an error's shape is decided."""
    return {
        "code": code,
        "message": message,
        "data": {"type": type_, "message": message, "request_id": request_id, **details},
    }


def app_error_object(exc: AppError, request_id: str) -> dict:
    return error_object(exc.code, exc.message, exc.type, request_id, **exc.details)


def protocol_error_object(
    code: int, request_id: str, detail: str | None = None, **details: Any
) -> dict:
    """A -327xx/-326xx error; ``detail`` is our own description of what was wrong."""
    type_ = {METHOD_NOT_FOUND: "not_found", INTERNAL_ERROR: "internal_error"}.get(
        code, "bad_request"
    )
    message = PROTOCOL_MESSAGES[code]
    obj = error_object(code, message, type_, request_id, **details)
    if detail:
        obj["data"]["message"] = detail
    return obj
