"""The methods about who is calling: profile, user.current and app.info."""

from __future__ import annotations

from typing import Any

from sidecar.emulator.model import Caller, Method, MethodResult
from sidecar.emulator.oauth import OAuthServer

__all__ = ["Account"]


class Account:
    """The fixed admin user every token acts as, and the app a token belongs to."""

    def __init__(self, oauth: OAuthServer) -> None:
        """Look apps up on `oauth` for app.info."""
        self._oauth = oauth

    def methods(self) -> dict[str, Method]:
        """Name the REST methods this part serves, with the scope each needs."""
        return {
            "profile": Method(None, self._profile),
            "user.current": Method("user", self._user_current),
            "app.info": Method(None, self._app_info),
        }

    def _profile(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `profile` for the fixed admin user."""
        return MethodResult(
            {
                "ID": str(caller.user_id),
                "ADMIN": True,
                "NAME": "Admin",
                "LAST_NAME": "Emulator",
                "PERSONAL_GENDER": "",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": 0,
            }
        )

    def _user_current(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `user.current` for the fixed admin user."""
        return MethodResult(
            {
                "ID": str(caller.user_id),
                "XML_ID": None,
                "ACTIVE": True,
                "NAME": "Admin",
                "LAST_NAME": "Emulator",
                "SECOND_NAME": "",
                "EMAIL": "admin@example.com",
                "ADMIN": True,
                "IS_ONLINE": "Y",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": "0",
                "UF_DEPARTMENT": [1],
                "USER_TYPE": "employee",
            }
        )

    def _app_info(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `app.info` for the calling application."""
        app = self._oauth.app(caller.client_id) if caller.client_id is not None else None
        return MethodResult(
            {
                "ID": "1",
                "CODE": app.client_id if app is not None else "",
                "VERSION": 1,
                "STATUS": "L",
                "INSTALLED": True,
                "PAYMENT_EXPIRED": "N",
                "DAYS": None,
                "LANGUAGE_ID": "en",
                "LICENSE": "en_project",
                "LICENSE_TYPE": "project",
                "LICENSE_FAMILY": "project",
                "SCOPE": app.scope.split(",") if app is not None else [],
            }
        )
