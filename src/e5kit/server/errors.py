"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise :class:`APIError` with the native status; on ``/v1/*`` the handler answers as OpenAI
does (:func:`openai_status`: 400 ``invalid_request_error`` for anything wrong with the request
itself), so ``except openai.BadRequestError`` catches e5kit's too. The ``openai`` client picks its
exception class from the status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 503 InternalServerError) and reads ``message`` from this body.
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

    def response(self, openai: bool = False) -> JSONResponse:
        status = openai_status(self.status, self.code) if openai else self.status
        return error_response(status, self.message, self.type, self.param, self.code, self.headers)


def openai_status(status: int, code: str | None = None) -> int:
    """OpenAI's status for a native one: request problems (415, 422, too many inputs or tokens) are 400.

    413 stays only for bodies over the byte limit (code ``request_too_large``), refused before the
    body is read, as a proxy would.
    """
    if status in (415, 422) or (status == 413 and code != "request_too_large"):
        return 400
    return status


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
