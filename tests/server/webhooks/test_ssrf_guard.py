"""The SSRF guard (server/webhooks/ssrf.py): which webhook URLs pass, with a fake resolver
standing in for DNS, so a name can resolve to anything, change its answer between two
checks (rebinding), or fail."""

from __future__ import annotations

import ipaddress

import pytest

from server.webhooks.ssrf import Guard, TargetRefused

DNS = {
    "hooks.example.com": ["93.184.215.14"],
    "v6.example.com": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "mixed.example.com": ["93.184.215.14", "10.0.0.7"],
    "inside.corp": ["192.168.1.20"],
    "receiver.test": ["127.0.0.1"],
}


def fake_dns(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError(f"[Errno -2] Name or service not known: {host}")
    return DNS[host]


@pytest.fixture
def guard() -> Guard:
    return Guard([], resolver=fake_dns)


def test_public_https_targets_pass_with_their_checked_addresses(guard: Guard) -> None:
    target = guard.check("https://hooks.example.com/in?x=1")
    assert target.addresses == [ipaddress.ip_address("93.184.215.14")]
    assert target.connect_url(target.addresses[0]) == "https://93.184.215.14:443/in?x=1"
    assert target.host_header() == "hooks.example.com"
    six = guard.check("https://v6.example.com:8443")
    assert six.connect_url(six.addresses[0]).startswith("https://[2606:2800:")
    assert six.host_header() == "v6.example.com:8443"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/", "a loopback address"),
        ("https://[::1]/", "a loopback address"),
        ("https://[::ffff:127.0.0.1]/", "a loopback address"),
        ("https://169.254.169.254/latest/meta-data", "the cloud metadata address"),
        ("https://[fd00:ec2::254]/", "the cloud metadata address"),
        ("https://169.254.10.1/", "a link-local address"),
        ("https://[fe80::1]/", "a link-local address"),
        ("https://10.1.2.3/", "a private address"),
        ("https://172.16.0.1/", "a private address"),
        ("https://192.168.0.1/", "a private address"),
        ("https://[fd12:3456::1]/", "a private address"),
        ("https://100.64.0.1/", "not a globally routable address"),
        ("https://224.0.0.1/", "a multicast address"),
        ("https://0.0.0.0/", "an unspecified address"),
        ("https://240.0.0.1/", "a reserved address"),
        ("https://inside.corp/hook", "resolves to a private address"),
        ("https://mixed.example.com/", "resolves to a private address"),
    ],
)
def test_non_public_addresses_are_refused(guard: Guard, url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        guard.check(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example.com/", "is not https"),
        ("ftp://hooks.example.com/", "must be https"),
        ("https:///nohost", "has no host"),
        ("https://user:pw@hooks.example.com/", "must not carry credentials"),
        ("https://hooks.example.com:99999/", "malformed"),
        ("https://nowhere.invalid/", "does not resolve"),
        ("https://hooks.example.com/" + "a" * 2048, "at most 2048"),
    ],
)
def test_malformed_or_plain_http_urls_are_refused(guard: Guard, url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        guard.check(url)


def test_a_refusal_does_not_say_where_a_name_resolves(guard: Guard) -> None:
    with pytest.raises(TargetRefused) as refused:
        guard.check("https://inside.corp/")
    assert "192.168" not in str(refused.value)


def test_a_rebound_name_is_refused_at_the_next_check(guard: Guard) -> None:
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    rebinding = Guard([], resolver=lambda host, port: next(answers))
    assert rebinding.check("https://flip.example.com/").addresses[0].is_global
    with pytest.raises(TargetRefused, match="loopback"):
        rebinding.check("https://flip.example.com/")


def test_the_allow_list_admits_hosts_and_networks_and_plain_http() -> None:
    by_host = Guard(["receiver.test"], resolver=fake_dns)
    assert by_host.check("http://receiver.test:9000/hook").port == 9000
    by_net = Guard(["127.0.0.0/8", "10.0.0.0/24"], resolver=fake_dns)
    assert str(by_net.check("http://127.0.0.1:8080/").addresses[0]) == "127.0.0.1"
    with pytest.raises(TargetRefused, match="private"):
        by_net.check("https://10.0.1.1/")  # outside the allowed /24
    with pytest.raises(TargetRefused, match="private"):
        by_host.check("https://inside.corp/")  # allowing one host allows no other
