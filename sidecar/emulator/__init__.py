"""A small Bitrix24 portal and OAuth server in one aiohttp app, faithful to the wire protocol.

Tests (and local experiments) point the sidecar at it instead of a real portal. All state lives on
the `Emulator` instance, so a test can inspect and poke it while the app is serving.

This module only re-exports. The parts, each importing only those listed before it:
model (shared records), wire (the REST wire format), oauth (the OAuth server), rest (REST
dispatch), batch, records (record tables and the list engine), crm (leads), lists (the list
methods over every table), account (profile, user.current, app.info), v3 (REST 3.0 at
/rest/api/: tasks and the v3 batch) and portal (the `Emulator` and its added `Portal`s that
assemble them and carry the test controls).
"""

from sidecar.emulator.batch import BATCH_MAX_LENGTH
from sidecar.emulator.model import EmulatorStats, OAuthFailure, RestCall
from sidecar.emulator.oauth import IssuedPair
from sidecar.emulator.portal import (
    EMULATOR_KEY,
    PORTAL_KEY,
    Emulator,
    Portal,
    run_emulator,
    run_portal,
)
from sidecar.emulator.records import PAGE_SIZE, Records
from sidecar.emulator.wire import render_xml

__all__ = [
    "BATCH_MAX_LENGTH",
    "EMULATOR_KEY",
    "PAGE_SIZE",
    "PORTAL_KEY",
    "Emulator",
    "EmulatorStats",
    "IssuedPair",
    "OAuthFailure",
    "Portal",
    "Records",
    "RestCall",
    "render_xml",
    "run_emulator",
    "run_portal",
]
