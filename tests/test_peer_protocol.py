"""The peer answer's checksum (issue 19, item 5): CRC-32C when both ends know it, CRC-32
with an end that does not name one; an answer is checked with the checksum it names."""

from __future__ import annotations

from typing import Any

from xarray_zcache.cache.hybrid import HybridCache, Read
from xarray_zcache.cache.settings import CacheSettings
from xarray_zcache.distributed.peer import CHECKSUMS, PeerTier, answer_crc

DATA = b"0123456789" * 10_000


def _tier() -> PeerTier:
    return PeerTier(None, HybridCache(CacheSettings(memory_size=1 << 20)), "me", 1.0)  # type: ignore[arg-type]


def _reply(kind: str | None, crc_kind: str = "crc32") -> dict[str, Any]:
    reply: dict[str, Any] = {
        "status": "ok",
        "key": "ns/k",
        "data": DATA,
        "length": len(DATA),
        "crc": answer_crc(DATA, None, 5.0, kind or crc_kind),
        "saved": True,
        "version": None,
        "confirmed": 5.0,
    }
    if kind is not None:
        reply["sum"] = kind
    return reply


def test_an_answer_is_checked_with_the_checksum_it_names() -> None:
    tier, read = _tier(), Read("ns/k", "chunk", "ns")
    assert CHECKSUMS[0] == "crc32c"
    for kind in CHECKSUMS:
        got = tier._check(_reply(kind), read)
        assert got is not None and got.value == DATA and got.confirmed == 5.0
    assert tier._check(_reply(None), read) is not None  # an owner that names none: CRC-32
    assert answer_crc(DATA, None, 5.0, "crc32c") != answer_crc(DATA, None, 5.0, "crc32")


def test_a_wrong_or_unknown_checksum_is_a_damaged_answer() -> None:
    tier, read = _tier(), Read("ns/k", "chunk", "ns")
    says_crc32c = _reply("crc32c")
    says_crc32c["crc"] = answer_crc(DATA, None, 5.0, "crc32")
    assert tier._check(says_crc32c, read) is None
    assert tier._check({**_reply("crc32c"), "sum": "md5"}, read) is None
    damaged = bytearray(DATA)
    damaged[5] ^= 1
    assert tier._check({**_reply("crc32c"), "data": bytes(damaged)}, read) is None
    assert tier._check({**_reply("crc32c"), "confirmed": 6.0}, read) is None


def _dated(owner_clock: float, confirmed_ago: float) -> dict[str, Any]:
    """An owner whose clock reads ``owner_clock`` confirmed ``confirmed_ago`` s before."""
    confirmed, age = owner_clock - confirmed_ago, confirmed_ago
    return {
        **_reply("crc32c"),
        "confirmed": confirmed,
        "age": age,
        "crc": answer_crc(DATA, None, confirmed, "crc32c", age),
    }


def test_a_replica_is_dated_on_the_askers_clock_whatever_the_owners_says() -> None:
    """Worker clocks disagree (no NTP, a paused VM): the owner's clock 1,000 s ahead or
    behind must neither stretch nor cut a replica's life. The owner sends how long ago
    it confirmed (its own clock only); the asker dates that from when it asked."""
    tier, read = _tier(), Read("ns/k", "chunk", "ns")
    sent = 10_000.0
    for skew in (+1000.0, -1000.0, 0.0):
        got = tier._check(_dated(sent + 0.01 + skew, confirmed_ago=3.0), read, sent)
        assert got is not None and got.confirmed == sent - 3.0
    # a negative age (a clock stepped back on the owner) counts as confirmed just now
    got = tier._check(_dated(sent, confirmed_ago=-2.0), read, sent)
    assert got is not None and got.confirmed == sent
    # the age is under the checksum too
    tampered = {**_dated(sent, confirmed_ago=3.0), "age": 0.5}
    assert tier._check(tampered, read, sent) is None
