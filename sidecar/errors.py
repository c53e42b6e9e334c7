"""Exceptions of the sidecar: one base class, subclasses carrying data.

The HTTP status of an error is chosen only at the edge (``sidecar.proxy``); these classes say what
went wrong in Bitrix24's vocabulary (``error`` code and ``error_description``).
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    code: str = "SIDECAR_ERROR"

    def __init__(self, description: str, *, code: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        if code is not None:
            self.code = code


class ConfigError(SidecarError):
    """One or more settings are missing or malformed; each problem names its variable."""

    code = "SIDECAR_CONFIG"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class StoreError(SidecarError):
    """The token store cannot be read or written."""

    code = "SIDECAR_STORE_ERROR"


class NotAuthorized(SidecarError):
    """No token pair is held: a person has to authorize the app first."""

    code = "SIDECAR_NOT_AUTHORIZED"


class ReauthorizationRequired(SidecarError):
    """The OAuth server refused the refresh token or the app for good: a person has to act."""

    code = "SIDECAR_REAUTHORIZATION_REQUIRED"


class TokenUnavailable(SidecarError):
    """The token has expired and a renewal failed for a reason that may pass."""

    code = "SIDECAR_TOKEN_UNAVAILABLE"


class OAuthError(SidecarError):
    """The OAuth server answered with an error, or did not answer usefully.

    ``permanent`` errors (a dead refresh token, a rejected app) will not pass by retrying.
    """

    code = "SIDECAR_OAUTH_ERROR"

    def __init__(self, description: str, *, error: str, permanent: bool) -> None:
        super().__init__(description)
        self.error = error
        self.permanent = permanent


class Refused(SidecarError):
    """A callback or install event that must not be trusted (wrong state, portal or token)."""

    code = "SIDECAR_REFUSED"


class ClientKeyRequired(SidecarError):
    """A call to /rest/ or /token without the client key (SIDECAR_CLIENT_KEY), or with a wrong one.

    Its code says which: ``SIDECAR_CLIENT_KEY_REQUIRED`` or ``SIDECAR_CLIENT_KEY_INVALID``.
    """

    code = "SIDECAR_CLIENT_KEY_REQUIRED"


class BadRequest(SidecarError):
    """The client's request is outside what the proxy forwards."""

    code = "SIDECAR_BAD_REQUEST"


class NotFound(SidecarError):
    """The path is not one the proxy serves."""

    code = "SIDECAR_NOT_FOUND"


class PortalRequired(SidecarError):
    """A call names no portal while the sidecar holds several (marketplace mode)."""

    code = "SIDECAR_PORTAL_REQUIRED"


class PortalUnknown(SidecarError):
    """A call names a portal (by host or member_id) the sidecar holds no authorization of."""

    code = "SIDECAR_PORTAL_UNKNOWN"


class PortalMismatch(SidecarError):
    """A call names two different portals, in its path and in the X-Bitrix-Portal header."""

    code = "SIDECAR_PORTAL_MISMATCH"


class MethodNotAllowed(SidecarError):
    """The HTTP method is not one Bitrix24 REST accepts."""

    code = "SIDECAR_METHOD_NOT_ALLOWED"


class ExpectationFailed(SidecarError):
    """The request's Expect header asks for something other than 100-continue."""

    code = "SIDECAR_EXPECTATION_FAILED"


class ClientGone(SidecarError):
    """The client hung up before its request was read whole; nothing was forwarded."""

    code = "SIDECAR_CLIENT_GONE"


class BodyTooLarge(SidecarError):
    """The request body is larger than ``SIDECAR_MAX_BODY``."""

    code = "SIDECAR_BODY_TOO_LARGE"


class UpstreamError(SidecarError):
    """The portal could not be reached or answered something unusable."""

    code = "SIDECAR_UPSTREAM_ERROR"


class QueueFull(SidecarError):
    """A call would wait longer than SIDECAR_QUEUE_TIMEOUT for the portal's rate limit.

    Its code is the portal's own, so client libraries that retry on it keep working.
    """

    code = "QUERY_LIMIT_EXCEEDED"

    def __init__(self, description: str, *, retry_after: float) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class MethodPaused(SidecarError):
    """The portal blocked a method (OPERATION_TIME_LIMIT) for longer than a call may wait."""

    code = "OPERATION_TIME_LIMIT"

    def __init__(self, description: str, *, retry_after: float) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class UpstreamTimeout(SidecarError):
    """The portal did not answer within ``SIDECAR_UPSTREAM_TIMEOUT``."""

    code = "SIDECAR_UPSTREAM_TIMEOUT"


class InternalError(SidecarError):
    """A fault of the sidecar's own: the call may or may not have reached the portal."""

    code = "SIDECAR_INTERNAL_ERROR"


class RequestTimeout(SidecarError):
    """A client took too long to send its request (a slow-drip client, or a stalled one)."""

    code = "SIDECAR_REQUEST_TIMEOUT"


class Overloaded(SidecarError):
    """Too many requests of a kind that starts outbound work are already being served."""

    code = "SIDECAR_OVERLOADED"

    def __init__(self, description: str, *, retry_after: float) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class ListTooLarge(SidecarError):
    """A whole list asked for in one answer outgrew SIDECAR_LIST_MAX."""

    code = "SIDECAR_LIST_TOO_LARGE"


class BadPage(SidecarError):
    """A page of a whole list is not what the method's list looks like (or is out of order)."""

    code = "SIDECAR_LIST_UNEXPECTED"
