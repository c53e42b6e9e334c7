"""BITRIX_PORTAL as a list of portals and one-label patterns (marketplace mode, issue 14)."""

from __future__ import annotations

import pytest

from sidecar.portals import PortalList, parse_portals

LIST = "https://*.bitrix24.com,https://*.bitrix24.de,https://crm.example.com"


class TestParse:
    def test_one_portal_is_todays_single_portal(self) -> None:
        """A bare name, a host or a URL: one portal, as BITRIX_PORTAL always meant."""
        for text in ("corezoid", "corp.bitrix24.com", "https://corp.bitrix24.com/"):
            portals = parse_portals(text)
            assert portals.single, text
        assert str(parse_portals("corezoid")) == "https://corezoid.bitrix24.ru"

    def test_a_list_with_patterns(self) -> None:
        """Addresses and patterns, duplicates folded, shown back in order."""
        portals = parse_portals(f"{LIST}, https://CRM.example.com")
        assert not portals.single
        assert str(portals) == LIST

    @pytest.mark.parametrize("text", [
        "", " , ", "https://a.bitrix24.com,,https://b.bitrix24.com",
        "https://a.*.bitrix24.com", "https://*bitrix24.com", "https://**.bitrix24.com",
        "https://*.com", "ftp://*.bitrix24.com", "https://*.bitrix24.com/rest",
        "https://user@*.bitrix24.com", "https://*.bitrix24.com:99999",
    ])
    def test_bad_entries_are_refused(self, text: str) -> None:
        """Anything but addresses and leftmost-label patterns stops start-up."""
        with pytest.raises(ValueError, match=r"."):
            parse_portals(text)


class TestAllows:
    @pytest.mark.parametrize("url", [
        "https://a.bitrix24.com", "https://a.bitrix24.com/", "https://a.bitrix24.com/rest/",
        "https://A.Bitrix24.COM", "https://xn--80ak6aa92e.bitrix24.com",
        "https://a-b.bitrix24.de:443", "https://crm.example.com",
    ])
    def test_listed(self, url: str) -> None:
        """One label in place of '*', any case, the default port written or not."""
        assert parse_portals(LIST).allows(url)

    @pytest.mark.parametrize("url", [
        "https://a.b.bitrix24.com",  # a pattern matches exactly one label
        "https://bitrix24.com",  # and never none
        "http://a.bitrix24.com",  # another scheme
        "https://a.bitrix24.com:8443",  # another port
        "https://a.bitrix24.com.evil.example",
        "https://evilbitrix24.com",
        "https://a.bitrix24.com.",  # a trailing dot
        "https://-a.bitrix24.com",
        "https://a..bitrix24.com",
        "https://user@a.bitrix24.com",
        "https://a.bitrix24.com?x=1",
        "https://www.crm.example.com",  # an exact entry is exact
        "https://a.bitrix24.ru",
        "not a url", "", "https://", "https://a.bitrix24.com:bad",
    ])
    def test_not_listed(self, url: str) -> None:
        """What matches nothing is refused, whatever its shape."""
        assert not parse_portals(LIST).allows(url)

    def test_a_port_is_part_of_the_portal(self) -> None:
        """The emulator's portals live on loopback ports: the port must match too."""
        portals = parse_portals("http://127.0.0.1:8081,http://*.portals.test:8082")
        assert portals.allows("http://127.0.0.1:8081/rest/")
        assert not portals.allows("http://127.0.0.1:8082")
        assert portals.allows("http://a.portals.test:8082")
        assert not portals.allows("http://a.portals.test")


class TestOnePortal:
    @pytest.mark.parametrize(("address", "shown"), [
        ("https://corp.bitrix24.com", "https://corp.bitrix24.com"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("https://crm.example.com/b24", "https://crm.example.com"),
    ])
    def test_of_takes_one_address_as_it_is(self, address: str, shown: str) -> None:
        """The one portal a sidecar serves today, whatever address it was given, is listed."""
        portals = PortalList.of(address)
        assert portals.single
        assert str(portals) == shown
        assert portals.allows(f"{shown}/rest/")

    def test_an_ipv6_portal_in_a_list(self) -> None:
        """An IPv6 literal is an address like any, shown back in brackets."""
        portals = parse_portals("http://[::1]:9001,http://[::1]:9002")
        assert str(portals) == "http://[::1]:9001,http://[::1]:9002"
        assert portals.allows("http://[::1]:9002/rest/")
        assert not portals.allows("http://[::1]:9003")
        assert not portals.allows("http://[::g]:9001")
