"""Two server processes on one PostgreSQL ledger behind the SDK's round_robin client, one SIGKILLed
under a mixed Embed/Verify load from 8 clients and restarted (:mod:`shallowmark.server.replicas`:
real processes, a real PostgreSQL, real signals)."""

from __future__ import annotations

import pytest

from shallowmark.client import replica_target
from shallowmark.errors import InvalidParameterError
from shallowmark.server.replicas import ReplicasConfig, render, run_replicas


def test_replica_target_names_every_replica_or_says_what_to_give():
    assert replica_target(["127.0.0.1:1", "10.0.0.2:50051"]) == "ipv4:127.0.0.1:1,10.0.0.2:50051"
    assert replica_target(["[::1]:5"]) == "ipv6:[::1]:5"
    for bad, needle in ((["wm.internal:50051"], "is not IP:port"), (["127.0.0.1"], "is not IP:port"),
                        (["127.0.0.1:99999"], "is not IP:port"), ([], "at least one"),
                        (["127.0.0.1:1", "[::1]:2"], "mix IPv4 and IPv6")):
        with pytest.raises(InvalidParameterError, match=needle):
            replica_target(bad)


def test_a_replica_killed_under_load_loses_no_call_and_no_record(tmp_path, pg_url):
    rep = run_replicas(ReplicasConfig(clients=8, calls_per_client=6, kill_after=12), pg_url, tmp_path)
    assert rep["killed"], "replica A was not SIGKILLed"
    assert rep["at_kill"]["a_in_flight"] >= 1 and rep["at_kill"]["a_served"] >= 1   # it died mid-work
    # no call failed beyond the retry policy, and every Verify found its image's watermark
    assert rep["failures"] == [] and rep["answered"] == rep["calls"] == 48
    assert rep["verifies_detected"] == rep["verifies"] > 0
    # the ledger: every acknowledged embed once, with the hash the client got, and nothing else
    led = rep["ledger"]
    assert led["records"] == rep["embeds_acknowledged"] > 0
    assert led["missing"] == led["duplicated"] == led["unacknowledged"] == led["hash_mismatch"] == []
    # the killed replica, restarted, serves alone and gets balanced calls again
    assert rep["rejoin"]["alone_detected"] and rep["rejoin"]["balanced_detected"]
    assert rep["rejoin"]["verifies_on_a"] >= 1
    assert "| calls failed (beyond the retry policy) | 0 |" in render(rep)
