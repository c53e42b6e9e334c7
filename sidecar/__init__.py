"""bitrix-sidecar: a token-keeping reverse proxy for the Bitrix24 REST API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bitrix-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
