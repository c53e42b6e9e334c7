"""The authorization's state machine, transition by transition (sidecar/states.py)."""

from __future__ import annotations

import itertools

import pytest

from sidecar.states import TRANSITIONS, IllegalTransition, Life, State
from sidecar.storage import StoredState, TokenPair


def pair(n: int) -> TokenPair:
    """Return a distinct pair."""
    return TokenPair(access_token=f"a{n}", refresh_token=f"r{n}", expires_at=10_000.0 + n)


def life_in(state: State) -> Life:
    """Return a life brought to ``state`` through legal transitions only."""
    life = Life()
    if state is State.NOT_AUTHORIZED:
        return life
    life.adopt(StoredState(pair=pair(1), generation=1))
    if state is State.VALID:
        return life
    life.begin_refresh()
    if state is State.REFRESHING:
        return life
    permanent = state is not State.FAILING
    life.refresh_failed("no", now=1.0, permanent=permanent,
                        client_rejected=state is State.CLIENT_REJECTED, retry_at=5.0)
    assert life.state is state
    return life


ALLOWED = sorted(((s, t) for s, targets in TRANSITIONS.items() for t in targets),
                 key=lambda st: (st[0].value, st[1].value))
FORBIDDEN = sorted(((s, t) for s, t in itertools.product(State, State)
                    if t not in TRANSITIONS[s]), key=lambda st: (st[0].value, st[1].value))


class TestTable:
    @pytest.mark.parametrize(("source", "target"), ALLOWED,
                             ids=[f"{s.value}->{t.value}" for s, t in ALLOWED])
    def test_an_allowed_move_is_made(self, source: State, target: State) -> None:
        """Every move in the table goes through."""
        life = life_in(source)
        life.move(target)
        assert life.state is target

    @pytest.mark.parametrize(("source", "target"), FORBIDDEN,
                             ids=[f"{s.value}->{t.value}" for s, t in FORBIDDEN])
    def test_an_illegal_move_is_refused_and_changes_nothing(
        self, source: State, target: State
    ) -> None:
        """A move outside the table raises at once and leaves the state as it was."""
        life = life_in(source)
        with pytest.raises(IllegalTransition):
            life.move(target)
        assert life.state is source

    def test_the_table_is_the_one_designed(self) -> None:
        """The table, written out: a change to it is a change to this test too."""
        n, v, r, f = (State.NOT_AUTHORIZED, State.VALID, State.REFRESHING, State.FAILING)
        dead, rejected = State.REAUTHORIZATION_REQUIRED, State.CLIENT_REJECTED
        assert {
            n: {v, dead},
            v: {v, r, n, dead, rejected},
            r: {v, f, n, dead, rejected},
            f: {v, r, n, dead, rejected},
            dead: {v, dead, n},
            rejected: {v, n, dead, rejected},
        } == TRANSITIONS

    @pytest.mark.parametrize("state", list(State))
    @pytest.mark.parametrize("entry", ["empty", "pair", "new_pair", "dead"])
    def test_adopt_works_from_every_state(self, state: State, entry: str) -> None:
        """Whatever the store holds, taking it in never breaks the table."""
        stored = {
            "empty": StoredState(pair=None, generation=5),
            "pair": StoredState(pair=pair(1), generation=1),
            "new_pair": StoredState(pair=pair(2), generation=2),
            "dead": StoredState(pair=pair(1), generation=1, reauth_required=True),
        }[entry]
        life = life_in(state)
        life.adopt(stored)
        if entry == "empty":
            assert life.state is State.NOT_AUTHORIZED
        elif entry == "dead":
            assert life.state is State.REAUTHORIZATION_REQUIRED
        elif state is State.REFRESHING:
            assert life.state is State.REFRESHING
        elif entry == "new_pair" or state in (State.NOT_AUTHORIZED,
                                              State.REAUTHORIZATION_REQUIRED):
            assert life.state is State.VALID
        else:
            assert life.state is state

    def test_the_forbidden_moves_include_the_dangerous_ones(self) -> None:
        """No renewal starts without a pair or after the app was refused, and nothing fails
        that is not renewing."""
        assert (State.NOT_AUTHORIZED, State.REFRESHING) in FORBIDDEN
        assert (State.REAUTHORIZATION_REQUIRED, State.REFRESHING) in FORBIDDEN
        assert (State.CLIENT_REJECTED, State.REFRESHING) in FORBIDDEN
        assert (State.VALID, State.FAILING) in FORBIDDEN
        assert (State.NOT_AUTHORIZED, State.FAILING) in FORBIDDEN


class TestTransitions:
    def test_a_loaded_pair_is_valid(self) -> None:
        """Adopting a stored pair from nothing makes the authorization valid."""
        life = Life()
        assert life.adopt(StoredState(pair=pair(1), generation=1))
        assert life.state is State.VALID

    def test_a_stored_dead_pair_requires_a_person(self) -> None:
        """A store that says re-authorization is required is believed at load."""
        life = Life()
        life.adopt(StoredState(pair=pair(1), generation=1, reauth_required=True))
        assert life.state is State.REAUTHORIZATION_REQUIRED
        assert life.state.dead

    def test_an_emptied_store_means_not_authorized(self) -> None:
        """A store that no longer holds a pair takes the authorization back to the start."""
        life = life_in(State.VALID)
        life.adopt(StoredState(pair=None, generation=2))
        assert life.state is State.NOT_AUTHORIZED

    def test_a_renewal_succeeds(self) -> None:
        """A renewal's new pair makes the authorization valid and clears failures."""
        life = life_in(State.FAILING)
        life.begin_refresh()
        life.refreshed(pair(2), 2)
        assert (life.state, life.failures, life.pair) == (State.VALID, 0, pair(2))

    def test_a_passing_failure_backs_off(self) -> None:
        """A transient failure counts, and says when to try again."""
        life = life_in(State.FAILING)
        assert (life.failures, life.next_attempt_at) == (1, 5.0)
        assert life.stored.last_error == "no"

    def test_a_permanent_failure_needs_a_person(self) -> None:
        """A refused refresh token ends in re-authorization required."""
        assert life_in(State.REAUTHORIZATION_REQUIRED).stored.reauth_required

    def test_a_refused_app_is_its_own_state(self) -> None:
        """invalid_client is told apart from a dead token."""
        life = life_in(State.CLIENT_REJECTED)
        assert life.state.dead

    def test_a_new_pair_during_a_renewal_keeps_it_renewing(self) -> None:
        """A pair adopted while a renewal runs does not end the renewal."""
        life = life_in(State.REFRESHING)
        assert life.adopt(StoredState(pair=pair(2), generation=2))
        assert life.state is State.REFRESHING

    def test_a_new_pair_ends_a_failure(self) -> None:
        """A pair stored by someone else cures a failing authorization."""
        life = life_in(State.FAILING)
        life.adopt(StoredState(pair=pair(2), generation=2))
        assert (life.state, life.failures) == (State.VALID, 0)

    def test_the_same_pair_again_changes_nothing(self) -> None:
        """Adopting the pair already held keeps a failing renewal failing."""
        life = life_in(State.FAILING)
        assert not life.adopt(StoredState(pair=pair(1), generation=1))
        assert life.state is State.FAILING

    def test_a_new_pair_revives_a_dead_authorization(self) -> None:
        """The operator's new pair brings a dead authorization back."""
        life = life_in(State.REAUTHORIZATION_REQUIRED)
        life.adopt(StoredState(pair=pair(2), generation=3))
        assert life.state is State.VALID

    def test_a_failure_after_the_pair_changed_is_ignored(self) -> None:
        """A renewal that fails after an uninstall does not bring the pair back to life."""
        life = life_in(State.REFRESHING)
        life.revoked("uninstalled", now=2.0)
        assert not life.refresh_failed("late", now=3.0, permanent=False,
                                       client_rejected=False, retry_at=9.0)
        assert life.state is State.REAUTHORIZATION_REQUIRED
        assert life.stored.last_error == "uninstalled"

    def test_settling_ends_a_renewal_without_a_verdict(self) -> None:
        """A renewal that adopted the store's pair (or broke) leaves the renewing state."""
        life = life_in(State.REFRESHING)
        life.settle()
        assert life.state is State.VALID
        failing = life_in(State.FAILING)
        failing.begin_refresh()
        failing.settle()
        assert failing.state is State.FAILING

    @pytest.mark.parametrize("state", [State.NOT_AUTHORIZED, State.REAUTHORIZATION_REQUIRED,
                                       State.CLIENT_REJECTED, State.REFRESHING])
    def test_a_renewal_cannot_start_from_here(self, state: State) -> None:
        """Without a usable pair, or with a renewal running, no renewal starts."""
        life = life_in(state)
        with pytest.raises(IllegalTransition):
            life.begin_refresh()

    def test_an_uninstall_kills_a_valid_pair(self) -> None:
        """The uninstall event's transition."""
        life = life_in(State.VALID)
        life.revoked("uninstalled", now=2.0)
        assert life.state is State.REAUTHORIZATION_REQUIRED

    def test_an_uninstall_cannot_kill_what_is_not_there(self) -> None:
        """Revoking with no pair is refused."""
        with pytest.raises(IllegalTransition):
            Life().revoked("uninstalled", now=2.0)
