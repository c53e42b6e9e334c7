"""Fixtures for tests of list methods and REST 3.0: an emulator whose app may read users,
tasks, lists and the catalog too, and an authorized sidecar in front of it. A test module
imports them (pytest finds fixtures in the module's namespace)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator, run_emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock

Client = TestClient[Any, Any]
SCOPE = "crm,user,task,lists,catalog"


@pytest.fixture
async def emulator(emulator_clock: OffsetClock) -> AsyncIterator[Emulator]:
    """An emulator whose app may read users, tasks, lists and the catalog too."""
    emu = Emulator(clock=emulator_clock)
    emu.register_app(CLIENT_ID, CLIENT_SECRET, scope=SCOPE)
    async with run_emulator(emu):
        yield emu


@pytest.fixture
def list_settings(make_settings: Callable[..., Settings], emulator: Emulator) -> Callable[
        ..., Settings]:
    """Settings of an authorized sidecar with the wider scope."""

    def make(**flags: Any) -> Settings:
        return make_settings(auth_code=emulator.issue_code(CLIENT_ID), scope=SCOPE, **flags)

    return make


@pytest.fixture
async def sidecar(list_settings: Callable[..., Settings],
                  aiohttp_client: Callable[..., Any]) -> Client:
    """A served sidecar with the wider scope."""
    client: Client = await aiohttp_client(create_app(list_settings(), watch_interval=0.05))
    return client


def ids(records: list[dict[str, Any]], key: str = "ID") -> list[int]:
    """The records' ids as numbers."""
    return [int(record[key]) for record in records]
