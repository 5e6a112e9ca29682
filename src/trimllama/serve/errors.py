"""Errors the server answers with, in the OpenAI error shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}
"""

from __future__ import annotations

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_overloaded_error",
}


class APIError(Exception):
    """An answer other than 200: HTTP status, a message naming the problem, and where it is.

    Attributes:
        status: HTTP status code.
        message: one line naming the problem.
        param: the request field at fault (e.g. "messages[0].content[1].image_url"), or None.
        code: a short machine-readable code (e.g. "image_too_large"), or None.
        headers: extra response headers (Retry-After, WWW-Authenticate).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The OpenAI error JSON object."""
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)
