"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The ``openai`` client picks its exception class from the status code (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 422 UnprocessableEntityError, 429 RateLimitError,
413 a plain APIStatusError) and reads ``message`` from this body.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _default_type(status)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type or _default_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
