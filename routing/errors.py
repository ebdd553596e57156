"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the status
OpenAI would use, so SDK clients raise the exception class users expect."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def from_engine_error(payload: dict[str, Any], status: int) -> OpenAIError:
    """Normalise vLLM's ErrorResponse (type=class name, code=int) to OpenAI's shape."""
    error = payload.get("error", payload) if isinstance(payload, dict) else {}
    message = str(error.get("message") or "engine error")
    param = error.get("param")
    code = error.get("code")
    # vLLM puts the HTTP status in `code`; OpenAI uses a short string or null.
    code_str = code if isinstance(code, str) else None
    if status == 400 and "context length" in message.lower():
        code_str = "context_length_exceeded"
    return OpenAIError(status, message, param=param, code=code_str)
