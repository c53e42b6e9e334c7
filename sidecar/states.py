"""The life of one authorization as explicit states and a transition table; no I/O.

In the manner of h11's ``_state.py``: every change goes through ``Life.move``, which refuses an
illegal transition at once instead of leaving a flag half-set, and readiness, ``/status`` and
the alerts are read from the state, never recombined from booleans.
"""

from __future__ import annotations

import enum
from dataclasses import replace

from sidecar.storage import StoredState, TokenPair


class State(enum.Enum):
    """Where an authorization stands."""

    NOT_AUTHORIZED = "not_authorized"  # no pair: a person must approve the app
    VALID = "valid"  # a pair is held and renewals succeed
    REFRESHING = "refreshing"  # a renewal is under way (the held token still serves)
    FAILING = "failing"  # the last renewal failed for a passing reason; backing off
    REAUTHORIZATION_REQUIRED = "reauthorization_required"  # the refresh token is dead
    CLIENT_REJECTED = "client_rejected"  # the OAuth server refused the app (id or secret)

    @property
    def dead(self) -> bool:
        """Say whether only a person (or a fixed configuration) can bring it back."""
        return self in (State.REAUTHORIZATION_REQUIRED, State.CLIENT_REJECTED)

    @classmethod
    def of_stored(cls, stored: StoredState) -> State:
        """The state a freshly loaded store entry puts an authorization in."""
        if stored.reauth_required:
            return cls.REAUTHORIZATION_REQUIRED
        return cls.NOT_AUTHORIZED if stored.pair is None else cls.VALID


_DEAD = {State.REAUTHORIZATION_REQUIRED, State.CLIENT_REJECTED}
# Which state may follow which. A pair stored by someone else (the CLI, another replica) or
# installed by the operator may arrive in any state; everything else follows the renewal.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.NOT_AUTHORIZED: frozenset({State.VALID, State.REAUTHORIZATION_REQUIRED}),
    State.VALID: frozenset({State.VALID, State.REFRESHING, State.NOT_AUTHORIZED, *_DEAD}),
    State.REFRESHING: frozenset({State.VALID, State.FAILING, State.NOT_AUTHORIZED, *_DEAD}),
    State.FAILING: frozenset({State.VALID, State.REFRESHING, State.NOT_AUTHORIZED, *_DEAD}),
    State.REAUTHORIZATION_REQUIRED: frozenset({State.VALID, State.REAUTHORIZATION_REQUIRED,
                                               State.NOT_AUTHORIZED}),
    State.CLIENT_REJECTED: frozenset({State.VALID, State.NOT_AUTHORIZED, *_DEAD}),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug of ours, never a client's doing."""

    def __init__(self, source: State, target: State) -> None:
        super().__init__(f"an authorization cannot go from {source.value} to {target.value}")
        self.source = source
        self.target = target


class Life:
    """One authorization's state, the stored entry it stands on, and its renewal counters."""

    def __init__(self) -> None:
        self.state = State.NOT_AUTHORIZED
        self.stored = StoredState(pair=None)
        self.failures = 0  # renewals failed in a row
        self.next_attempt_at = 0.0  # when a failing renewal may be tried again

    @property
    def pair(self) -> TokenPair | None:
        """Return the pair held, usable or not."""
        return self.stored.pair

    def move(self, target: State) -> None:
        """Go to ``target``; raise IllegalTransition if the table forbids it."""
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.state, target)
        self.state = target

    # -- transitions -------------------------------------------------------------------------

    def adopt(self, stored: StoredState) -> bool:
        """Take what the store (or an install) holds; return whether the pair changed.

        A new pair ends any failure; the same pair keeps the renewal's standing. A renewal
        under way stays under way: its outcome decides what follows.
        """
        changed = stored.pair != self.stored.pair
        self.stored = stored
        if stored.pair is None:
            target = State.REAUTHORIZATION_REQUIRED if stored.reauth_required else (
                State.NOT_AUTHORIZED)
        elif stored.reauth_required:
            target = State.REAUTHORIZATION_REQUIRED
        elif changed or self.state in (State.NOT_AUTHORIZED, State.REAUTHORIZATION_REQUIRED):
            target = State.REFRESHING if self.state is State.REFRESHING else State.VALID
        else:
            target = self.state  # the same pair: nothing about its renewal changed
        if changed:
            self.failures = 0
        if target is not self.state:
            self.move(target)
        return changed

    def begin_refresh(self) -> None:
        """A renewal starts."""
        self.move(State.REFRESHING)

    def refreshed(self, pair: TokenPair, generation: int, by: str = "") -> None:
        """A renewal (of replica ``by``) brought a new pair."""
        self.stored = StoredState(pair=pair, generation=generation, last_refresh_by=by)
        self.failures = 0
        self.move(State.VALID)

    def refresh_failed(self, description: str, *, now: float, permanent: bool,
                       client_rejected: bool, retry_at: float) -> bool:
        """A renewal failed: back off, or give up until a person (or a restart) acts.

        Return False, changing nothing, when the renewal's verdict no longer counts: the app
        was uninstalled, or the store's pair was taken in as dead or absent, while it ran.
        """
        if self.state is not State.REFRESHING:
            return False
        self.failures += 1
        self.stored = replace(self.stored, reauth_required=permanent, last_error=description,
                              last_error_at=now)
        if client_rejected:
            self.move(State.CLIENT_REJECTED)
        elif permanent:
            self.move(State.REAUTHORIZATION_REQUIRED)
        else:
            self.next_attempt_at = retry_at
            self.move(State.FAILING)
        return True

    def settle(self) -> None:
        """A renewal ended without a verdict of its own (it adopted the store's pair, or broke)."""
        if self.state is State.REFRESHING:
            self.move(State.FAILING if self.failures else State.VALID)

    def revoked(self, description: str, *, now: float) -> None:
        """The app was uninstalled: the pair is dead (there must be one to kill)."""
        if self.pair is None:
            raise IllegalTransition(self.state, State.REAUTHORIZATION_REQUIRED)
        self.failures += 1
        self.stored = replace(self.stored, reauth_required=True, last_error=description,
                              last_error_at=now)
        self.move(State.REAUTHORIZATION_REQUIRED)

    def saved_as(self, generation: int) -> None:
        """A pair held only in memory reached the store as ``generation``."""
        self.stored = replace(self.stored, generation=generation)
