"""Settings: every form the contract names, and every bad variable reported at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import (
    OAUTH_RU,
    OAUTH_WEST,
    OPTIONS,
    Listen,
    Settings,
    load_settings,
    parse_duration,
    parse_portal,
    parse_size,
)
from sidecar.errors import ConfigError

LIST = "https://*.bitrix24.com,https://*.bitrix24.de,https://crm.example.com"
BASE = {
    "BITRIX_PORTAL": "corezoid",
    "BITRIX_CLIENT_ID": "local.1.2",
    "BITRIX_CLIENT_SECRET": "s3cret-value",
}


class TestPortal:
    @pytest.mark.parametrize(
        ("given", "portal", "oauth"),
        [
            ("corezoid", "https://corezoid.bitrix24.ru", OAUTH_RU),
            ("corp.bitrix24.com", "https://corp.bitrix24.com", OAUTH_WEST),
            ("corp.bitrix24.kz", "https://corp.bitrix24.kz", OAUTH_RU),
            ("https://crm.example.com/", "https://crm.example.com", OAUTH_WEST),
            ("http://127.0.0.1:9000", "http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ],
    )
    def test_portal_forms_and_oauth_zone(self, given: str, portal: str, oauth: str) -> None:
        """A bare name, a host and a URL all become a base URL, and pick the zone's OAuth server."""
        settings = load_settings({**BASE, "BITRIX_PORTAL": given})
        assert settings.portal == portal
        assert settings.oauth_url == oauth
        assert settings.token_url == f"{oauth}/oauth/token/"

    def test_explicit_oauth_url_wins_and_tolerates_a_pasted_token_path(self) -> None:
        """BITRIX_OAUTH_URL overrides the zone default; a trailing /oauth/token/ is dropped."""
        settings = load_settings({**BASE, "BITRIX_OAUTH_URL": "https://o.example/oauth/token/"})
        assert settings.token_url == "https://o.example/oauth/token/"


class TestPortalList:
    """BITRIX_PORTAL as a list of portals and patterns: marketplace mode (issue 14)."""

    @pytest.mark.parametrize("given", [
        "corezoid", "corp.bitrix24.com", "https://crm.example.com/", "http://127.0.0.1:9000",
        # What one portal accepted before the list form, a path and an IPv6 literal too.
        "https://crm.example.com/b24", "http://[::1]:9000", "CORP.Bitrix24.com:8443",
    ])
    def test_one_portal_is_unchanged(self, given: str) -> None:
        """One address: portal and rest_base as always, a one-rule list, no marketplace."""
        settings = load_settings({**BASE, "BITRIX_PORTAL": given})
        assert settings.portal == parse_portal(given)
        assert settings.rest_base == f"{parse_portal(given)}/rest/"
        assert settings.portals.single
        assert not settings.marketplace
        assert settings.portals.allows(settings.rest_base)

    def test_a_list_is_marketplace_mode_with_no_one_portal(self) -> None:
        """A list: every entry kept, and no one portal address for anything to use."""
        settings = load_settings({**BASE, "BITRIX_PORTAL": f" {LIST} "})
        assert settings.marketplace
        assert str(settings.portals) == LIST
        assert (settings.portal, settings.rest_base) == ("", "")
        assert settings.portals.allows("https://a.bitrix24.de/rest/")
        assert not settings.portals.allows("https://a.bitrix24.ru")
        assert settings.oauth_url == OAUTH_WEST

    @pytest.mark.parametrize("given", ["https://*.bitrix24.com", "corp,corp2",
                                       "http://127.0.0.1:9001,http://127.0.0.1:9002"])
    def test_a_pattern_or_two_addresses_are_a_list(self, given: str) -> None:
        """One pattern names many portals, two addresses two: marketplace either way."""
        settings = load_settings({**BASE, "BITRIX_PORTAL": given,
                                  "BITRIX_OAUTH_URL": "http://127.0.0.1:9000"})
        assert settings.marketplace
        assert (settings.portal, settings.rest_base) == ("", "")

    def test_a_list_of_one_address_is_one_portal(self) -> None:
        """Duplicates fold: the same address twice is today's one portal."""
        settings = load_settings(
            {**BASE, "BITRIX_PORTAL": "https://corp.bitrix24.com, HTTPS://Corp.Bitrix24.com"})
        assert not settings.marketplace
        assert settings.portal == "https://corp.bitrix24.com"
        assert settings.rest_base == "https://corp.bitrix24.com/rest/"

    @pytest.mark.parametrize("given", [
        "https://*.bitrix24.com,", "https://*.com", "https://a.*.bitrix24.com,corp",
        "https://*.bitrix24.com,https://crm.example.com/b24", "corp,not a portal!",
        "ftp://*.bitrix24.com", "https://*.bitrix24.com:99999,corp",
    ])
    def test_a_bad_entry_names_bitrix_portal(self, given: str) -> None:
        """Any bad entry stops start-up, named by the variable (or flag) it came from."""
        with pytest.raises(ConfigError) as caught:
            load_settings({**BASE, "BITRIX_PORTAL": given})
        [problem] = caught.value.problems
        assert problem.startswith("BITRIX_PORTAL: "), problem
        with pytest.raises(ConfigError) as caught:
            load_settings(BASE, {"portal": given})
        assert caught.value.problems[0].startswith("--portal: ")

    @pytest.mark.parametrize(("given", "oauth"), [
        ("https://*.bitrix24.ru,https://*.bitrix24.by,corp", OAUTH_RU),
        ("https://*.bitrix24.com,https://*.bitrix24.de,crm.example.com", OAUTH_WEST),
    ])
    def test_a_list_in_one_zone_picks_its_oauth_server(self, given: str, oauth: str) -> None:
        """The OAuth server of a list is its zone's, as for one portal."""
        assert load_settings({**BASE, "BITRIX_PORTAL": given}).oauth_url == oauth

    @pytest.mark.parametrize("given", ["https://*.bitrix24.ru,https://*.bitrix24.com",
                                       "http://127.0.0.1:9001,http://127.0.0.1:9002"])
    def test_a_list_across_zones_or_on_loopback_needs_bitrix_oauth_url(self, given: str) -> None:
        """No one OAuth server to guess: the operator names it, and then it is taken."""
        with pytest.raises(ConfigError) as caught:
            load_settings({**BASE, "BITRIX_PORTAL": given})
        [problem] = caught.value.problems
        assert problem.startswith("BITRIX_OAUTH_URL: required"), problem
        settings = load_settings({**BASE, "BITRIX_PORTAL": given,
                                  "BITRIX_OAUTH_URL": "https://oauth.example.com"})
        assert settings.token_url == "https://oauth.example.com/oauth/token/"

    def test_settings_built_in_code_hold_their_one_portal(self) -> None:
        """Settings made without load_settings (the demo) get the one portal's list, and a
        replaced portal brings its own."""
        settings = Settings(portal="http://127.0.0.1:9000", client_id="c", client_secret="s",
                            oauth_url="o")
        assert not settings.marketplace
        assert settings.portals.allows("http://127.0.0.1:9000/rest/")
        moved = replace(settings, portal="http://127.0.0.1:9001")
        assert moved.portals.allows("http://127.0.0.1:9001")
        assert not moved.portals.allows("http://127.0.0.1:9000")


class TestDefaults:
    def test_defaults_match_the_contract(self) -> None:
        """Unset optional variables take the documented defaults."""
        settings = load_settings(BASE)
        assert settings.listen == Listen("127.0.0.1", 8080)
        assert settings.db_path == Path("bitrix-sidecar.db")
        assert settings.refresh_interval == 25 * 60
        assert settings.upstream_timeout == 60
        assert settings.max_body == 16 * 1024 * 1024
        assert (settings.log_format, settings.log_level) == ("json", "info")
        assert settings.scope == ()
        assert settings.fast_lane is True

    def test_each_default_is_written_once(self) -> None:
        """Settings' field defaults are the options' default texts, parsed; help shows them."""
        bare = Settings(portal="p", client_id="c", client_secret="s", oauth_url="o")
        defaults = [option for option in OPTIONS if option.default]
        assert len(defaults) >= 10
        for option in defaults:
            assert option.parse is not None, option.env
            assert getattr(bare, option.dest) == option.parse(option.default), option.env
            assert option.help.endswith(f"(default {option.default})"), option.env
        assert bare.log_level == load_settings(BASE).log_level == "info"

    def test_required_options_are_marked_so(self) -> None:
        """The options that must be set say so themselves, and only they are reported missing."""
        assert [o.env for o in OPTIONS if o.required] == ["BITRIX_PORTAL", "BITRIX_CLIENT_ID"]
        with pytest.raises(ConfigError) as caught:
            load_settings({"BITRIX_CLIENT_SECRET": "s"})
        assert caught.value.problems == [
            "BITRIX_PORTAL: required (portal: bare name (= NAME.bitrix24.ru), host, or full URL; "
            "or, for a marketplace app, a comma-separated list of addresses and "
            "https://*.DOMAIN patterns)",
            "BITRIX_CLIENT_ID: required (application code (client_id))",
        ]

    def test_secret_is_not_in_repr(self) -> None:
        """The secret and the auth code never show in a repr (and so in a traceback's locals)."""
        settings = load_settings({**BASE, "BITRIX_AUTH_CODE": "code-abcdef"})
        assert "s3cret-value" not in repr(settings)
        assert "code-abcdef" not in repr(settings)


class TestParsers:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("90", 90), ("90s", 90), ("25m", 1500), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5),
         ("0", 0)],
    )
    def test_durations(self, text: str, seconds: float) -> None:
        """Durations accept bare seconds and unit suffixes."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "abc", "5x", "-1", "1.h", "m"])
    def test_bad_durations(self, text: str) -> None:
        """Anything else is an error, not silently a default."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration(text)

    @pytest.mark.parametrize(
        ("text", "size"), [("16MiB", 16 * 1024**2), ("512k", 512 * 1024), ("100", 100),
                           ("1MB", 10**6)]
    )
    def test_sizes(self, text: str, size: int) -> None:
        """Sizes accept bytes and binary or decimal units."""
        assert parse_size(text) == size


class TestErrors:
    def test_every_bad_variable_is_named_at_once(self) -> None:
        """One ConfigError lists each bad or missing variable."""
        env = {
            "BITRIX_PORTAL": "not a portal!",
            "SIDECAR_LISTEN": "nowhere",
            "SIDECAR_REFRESH_INTERVAL": "soon",
            "SIDECAR_UPSTREAM_TIMEOUT": "0",
            "SIDECAR_MAX_BODY": "big",
            "SIDECAR_LOG_FORMAT": "xml",
            "SIDECAR_LOG_LEVEL": "loud",
            "SIDECAR_FAST_LANE": "sometimes",
        }
        with pytest.raises(ConfigError) as caught:
            load_settings(env)
        text = caught.value.description
        for name in [*env, "BITRIX_CLIENT_ID", "BITRIX_CLIENT_SECRET"]:
            assert name in text, name
        assert len(caught.value.problems) == len(env) + 2

    def test_both_secret_forms_are_refused(self, tmp_path: Path) -> None:
        """Setting the secret and the secret file together is ambiguous."""
        secret_file = tmp_path / "secret"
        secret_file.write_text("from-file\n")
        with pytest.raises(ConfigError, match="set only one"):
            load_settings({**BASE, "BITRIX_CLIENT_SECRET_FILE": str(secret_file)})

    def test_secret_file_is_read_and_stripped(self, tmp_path: Path) -> None:
        """A Kubernetes-style secret file gives the secret without its newline."""
        secret_file = tmp_path / "secret"
        secret_file.write_text("from-file\n")
        env = {k: v for k, v in BASE.items() if k != "BITRIX_CLIENT_SECRET"}
        settings = load_settings({**env, "BITRIX_CLIENT_SECRET_FILE": str(secret_file)})
        assert settings.client_secret == "from-file"

    def test_missing_secret_file_is_named(self, tmp_path: Path) -> None:
        """An unreadable secret file is a configuration error naming the variable."""
        env = {k: v for k, v in BASE.items() if k != "BITRIX_CLIENT_SECRET"}
        with pytest.raises(ConfigError, match="BITRIX_CLIENT_SECRET_FILE"):
            load_settings({**env, "BITRIX_CLIENT_SECRET_FILE": str(tmp_path / "none")})

    def test_secret_optional_when_not_needed(self) -> None:
        """Commands that never talk to the OAuth server run without the secret."""
        env = {k: v for k, v in BASE.items() if k != "BITRIX_CLIENT_SECRET"}
        assert load_settings(env, need_secret=False).client_secret == ""


class TestFastLane:
    @pytest.mark.parametrize(("text", "on"), [("on", True), ("off", False), (" OFF ", False)])
    def test_on_or_off(self, text: str, on: bool) -> None:
        assert load_settings({**BASE, "SIDECAR_FAST_LANE": text}).fast_lane is on
        assert load_settings(BASE, {"fast_lane": text}).fast_lane is on

    @pytest.mark.parametrize("text", ["true", "1", "no", "fast"])
    def test_nothing_else(self, text: str) -> None:
        with pytest.raises(ConfigError, match=f"SIDECAR_FAST_LANE: {text!r} is not on or off"):
            load_settings({**BASE, "SIDECAR_FAST_LANE": text})


class TestFlags:
    def test_flags_win_over_environment(self, tmp_path: Path) -> None:
        """A flag overrides its variable; a secret flag overrides both secret variables."""
        secret_file = tmp_path / "secret"
        secret_file.write_text("from-file")
        settings = load_settings(
            {**BASE, "SIDECAR_LISTEN": "127.0.0.1:1"},
            {"listen": "127.0.0.1:2", "client_secret_file": str(secret_file)},
        )
        assert settings.listen.port == 2
        assert settings.client_secret == "from-file"

    def test_bad_flag_is_named_by_its_flag(self) -> None:
        """A bad flag value is reported under the flag's own name."""
        with pytest.raises(ConfigError, match="--refresh-interval"):
            load_settings(BASE, {"refresh_interval": "often"})


class TestReviewedParsers:
    def test_pathological_duration_is_rejected_at_once(self) -> None:
        """A long run of digits with a bad tail fails without backtracking for seconds."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration("1" * 40 + "x")

    @pytest.mark.parametrize("text", ["1ms", "500ms"])
    def test_refresh_interval_below_a_second_is_refused(self, text: str) -> None:
        """A refresh interval shorter than a second would hammer the OAuth server."""
        with pytest.raises(ConfigError, match="SIDECAR_REFRESH_INTERVAL"):
            load_settings({**BASE, "SIDECAR_REFRESH_INTERVAL": text})


class TestPublicUrl:
    @pytest.mark.parametrize(("given", "kept"), [
        ("https://Sidecar.Example.com/", "https://sidecar.example.com"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
    ])
    def test_an_origin_is_kept_lowercased(self, given: str, kept: str) -> None:
        """SIDECAR_PUBLIC_URL is an origin, normalized."""
        assert load_settings({**BASE, "SIDECAR_PUBLIC_URL": given}).public_url == kept

    @pytest.mark.parametrize("given", ["sidecar.example.com", "ftp://x", "https://x/oauth",
                                       "https://x?y=1", "https://user:pw@x"])
    def test_anything_but_an_origin_is_refused(self, given: str) -> None:
        """A path, a query, credentials or another scheme are named errors."""
        with pytest.raises(ConfigError, match="SIDECAR_PUBLIC_URL"):
            load_settings({**BASE, "SIDECAR_PUBLIC_URL": given})

    def test_a_published_oauth_listener_needs_it(self) -> None:
        """A non-loopback OAuth listener without its public address is a configuration error."""
        with pytest.raises(ConfigError, match="SIDECAR_PUBLIC_URL"):
            load_settings({**BASE, "SIDECAR_OAUTH_LISTEN": "0.0.0.0:8081"})
        settings = load_settings({**BASE, "SIDECAR_OAUTH_LISTEN": "0.0.0.0:8081",
                                  "SIDECAR_PUBLIC_URL": "https://sidecar.example.com"})
        assert settings.public_url == "https://sidecar.example.com"
        assert load_settings({**BASE, "SIDECAR_OAUTH_LISTEN": "127.0.0.1:8081"}).public_url == ""


class TestDatabase:
    URL = "postgresql://sidecar:pg-pass-0123456789@db.internal:5433/tokens"

    def test_a_path_stays_a_sqlite_file(self) -> None:
        """A file path is the SQLite store, as before; no URL is set."""
        settings = load_settings({**BASE, "SIDECAR_DB": "/var/lib/s/t.db"})
        assert settings.db_path == Path("/var/lib/s/t.db")
        assert settings.db_url == ""
        assert settings.db_shown == "/var/lib/s/t.db"

    @pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
    def test_a_url_is_a_postgresql_store(self, scheme: str) -> None:
        """Both schemes name a PostgreSQL store; the password is shown nowhere."""
        url = self.URL.replace("postgresql", scheme, 1)
        settings = load_settings({**BASE, "SIDECAR_DB": url})
        assert settings.db_url == url
        assert settings.db_passwords == ("pg-pass-0123456789",)
        assert settings.db_shown == f"{scheme.lower()}://sidecar@db.internal:5433/tokens"
        assert "pg-pass" not in repr(settings)

    def test_a_percent_encoded_password_is_hidden_in_both_forms(self) -> None:
        """The URL carries 'p@ss/word' as 'p%40ss%2Fword'; the driver sends it decoded, so an
        error may quote either: the redactor learns both."""
        url = "postgresql://sidecar:p%40ss%2Fword@db.internal/tokens"
        settings = load_settings({**BASE, "SIDECAR_DB": url})
        assert set(settings.db_passwords) == {"p%40ss%2Fword", "p@ss/word"}
        assert "p%40ss" not in settings.db_shown

    def test_the_url_is_read_from_a_file(self, tmp_path: Path) -> None:
        """SIDECAR_DB_FILE gives the URL (a Kubernetes Secret), without its newline."""
        (tmp_path / "db").write_text(self.URL + "\n")
        settings = load_settings({**BASE, "SIDECAR_DB_FILE": str(tmp_path / "db")})
        assert settings.db_url == self.URL

    def test_a_flag_overrides_the_file(self, tmp_path: Path) -> None:
        """--db wins over SIDECAR_DB_FILE, as a secret's flag wins over both its variables."""
        (tmp_path / "db").write_text(self.URL)
        settings = load_settings({**BASE, "SIDECAR_DB_FILE": str(tmp_path / "db")},
                                 {"db_path": "local.db"})
        assert (settings.db_url, settings.db_path) == ("", Path("local.db"))

    @pytest.mark.parametrize(("env", "message"), [
        ({"SIDECAR_DB": "postgresql://u:pg-pass-0123456789@/tokens"}, "SIDECAR_DB: .*no host"),
        ({"SIDECAR_DB": "postgresql://u:pg-pass-0123456789@h:99999/t"}, "SIDECAR_DB: .*bad port"),
        ({"SIDECAR_DB": "postgresql://u:pg-pass-0123456789@h"}, "SIDECAR_DB: .*no database"),
        ({"SIDECAR_DB": "mysql://u:pg-pass-0123456789@h/t"}, "SIDECAR_DB: .*postgresql://"),
    ])
    def test_a_bad_url_is_named_without_its_password(
        self, env: dict[str, str], message: str
    ) -> None:
        """A bad URL stops start-up naming the variable, never repeating the password."""
        with pytest.raises(ConfigError, match=message) as caught:
            load_settings({**BASE, **env})
        assert "pg-pass" not in caught.value.description

    def test_the_file_must_hold_a_url(self, tmp_path: Path) -> None:
        """A file of anything but a URL (or unreadable, or set with SIDECAR_DB) is refused."""
        (tmp_path / "db").write_text("./local.db")
        with pytest.raises(ConfigError, match=r"SIDECAR_DB_FILE: .* must hold a postgresql"):
            load_settings({**BASE, "SIDECAR_DB_FILE": str(tmp_path / "db")})
        with pytest.raises(ConfigError, match="SIDECAR_DB_FILE: cannot read"):
            load_settings({**BASE, "SIDECAR_DB_FILE": str(tmp_path / "none")})
        with pytest.raises(ConfigError, match="set only one"):
            load_settings({**BASE, "SIDECAR_DB": "x.db", "SIDECAR_DB_FILE": str(tmp_path / "db")})
