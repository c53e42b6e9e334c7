"""A small Bitrix24 portal and OAuth server in one aiohttp app, faithful to the wire protocol.

Tests (and local experiments) point the sidecar at it instead of a real portal. All state lives on
the `Emulator` instance, so a test can inspect and poke it while the app is serving. This package
only re-exports; the parts live in its modules.
"""

from sidecar.emulator.portal import (
    BATCH_MAX_LENGTH,
    EMULATOR_KEY,
    PAGE_SIZE,
    Emulator,
    EmulatorStats,
    IssuedPair,
    OAuthFailure,
    RestCall,
    render_xml,
    run_emulator,
)

__all__ = [
    "BATCH_MAX_LENGTH",
    "EMULATOR_KEY",
    "PAGE_SIZE",
    "Emulator",
    "EmulatorStats",
    "IssuedPair",
    "OAuthFailure",
    "RestCall",
    "render_xml",
    "run_emulator",
]
