"""``core/stats_share.py``: snapshots round-trip, counts add up, a dead worker's snapshot keeps
counting, unreadable snapshots are left out, and two SharedStats on one directory see each other.
"""

from __future__ import annotations

import asyncio

from onnxgate.core.serving.stats import ExecutionTiming, VersionStats
from onnxgate.core.serving.stats_share import SharedStats, from_doc, merge, read_snapshots, to_doc, write_snapshot


def _stats(name: str, version: int, requests: int, rows: int = 2, failures: int = 0) -> VersionStats:
    s = VersionStats(name, version)
    for i in range(requests):
        timing = ExecutionTiming(queue_ns=10 + i, input_ns=20, infer_ns=300, output_ns=40)
        s.record_execution(rows, timing)
        s.record_request(rows, 1000 + i, timing)
    for _ in range(failures):
        s.record_failure(50)
    return s


def test_a_snapshot_round_trips_every_field():
    s = _stats("m", 3, requests=4, failures=2)
    s.record_execution(7, ExecutionTiming(1, 2, 3, 4))
    assert from_doc(to_doc(s)) == s


def test_merge_adds_counts_and_durations_and_keeps_the_latest_inference():
    own = [_stats("m", 1, requests=3), _stats("only_here", 1, requests=1)]
    other = _stats("m", 1, requests=5, rows=4, failures=1)
    other.last_inference_ms = own[0].last_inference_ms + 1000
    (m, only_here) = merge(own, {("m", 1): other})
    assert m.inference_count == 3 * 2 + 5 * 4 and m.execution_count == 8
    assert (m.success.count, m.fail.count, m.queue.count) == (8, 1, 8)
    assert m.success.ns == own[0].success.ns + other.success.ns
    assert m.last_inference_ms == other.last_inference_ms
    assert sorted(m.batches) == [2, 4] and m.batches[4].compute_infer.count == 5
    assert only_here is own[1]  # nothing to add: the live object itself
    assert own[0].inference_count == 6, "merging must not change the worker's own counts"


def test_snapshots_of_other_workers_add_up_dead_or_alive_and_broken_ones_are_left_out(tmp_path):
    write_snapshot(tmp_path, "1.json", [to_doc(_stats("m", 1, requests=2))])
    write_snapshot(tmp_path, "2.json", [to_doc(_stats("m", 1, requests=3)), to_doc(_stats("n", 2, requests=1))])
    write_snapshot(tmp_path, "3.json", [to_doc(_stats("m", 1, requests=100))])  # "ours": skipped
    (tmp_path / "4.json").write_text("{not json")
    (tmp_path / ".5.json.tmp").write_text("[]")  # a write in progress is no snapshot
    totals = read_snapshots(tmp_path, skip="3.json")
    assert sorted(totals) == [("m", 1), ("n", 2)]
    assert totals[("m", 1)].inference_count == (2 + 3) * 2 and totals[("n", 2)].inference_count == 2


def test_two_workers_sharing_a_directory_answer_the_same_totals(tmp_path):
    a = [_stats("m", 1, requests=2)]
    b = [_stats("m", 1, requests=5)]
    share_a = SharedStats(tmp_path, lambda: a, name="a.json")
    share_b = SharedStats(tmp_path, lambda: b, name="b.json")

    async def main() -> None:
        await share_a.exchange()
        await share_b.exchange()  # b sees a's snapshot
        await share_a.exchange()  # a sees b's
        assert share_a.merged(a)[0].inference_count == share_b.merged(b)[0].inference_count == 14
        b[0].record_request(1, 10, ExecutionTiming(0, 0, 0, 0))
        assert share_b.merged(b)[0].inference_count == 15  # its own counts are live
        await share_b.close()  # the last snapshot, then a stops at once
        share_a.start()
        await share_a.close()
        assert share_a.merged(a)[0].inference_count == 15

    asyncio.run(main())
