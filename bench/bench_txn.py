"""What one Kafka transaction costs on this machine, without streamer: the floor under exactly-once latency.

One transactional aiokafka producer (as a worker has per input partition): begin, one record, the
consumed offset (AddOffsetsToTxn + TxnOffsetCommit), commit (EndTxn), ``--n`` times; beside it, the
at-least-once equivalent: one record acknowledged (acks=all), then an offset commit. Reports p50/p99 of each
in ms. Writes bench/results/txn.json.
Run: python bench/bench_txn.py [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import TopicPartition  # noqa: E402

from bench.bench_worker import machine  # noqa: E402
from streamer import WorkerSettings, kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": statistics.median(xs), "p99_ms": xs[int(0.99 * (len(xs) - 1))]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    broker = LocalKafka().start()
    tag = uuid.uuid4().hex[:8]
    s = WorkerSettings(bootstrap_servers=broker.bootstrap_servers, request_topic=f"t-{tag}.in",
                       results_topic=f"t-{tag}.out", group_id=f"g-{tag}")
    try:
        await kafka.ensure_topics(s, [kafka.TopicSpec(s.request_topic, 1), kafka.TopicSpec(s.results_topic, 1)])
        txn = kafka.producer(s, transactional_id=f"bench-{tag}")
        plain = kafka.producer(s)
        consumer = kafka.consumer(s, s.request_topic, group_id=s.group_id)
        await txn.start()
        await plain.start()
        await consumer.start()
        tp = TopicPartition(s.request_topic, 0)
        eos, alo = [], []
        try:
            for i in range(args.n):
                t = time.perf_counter()
                async with txn.transaction():
                    await txn.send(s.results_topic, b"x" * 200)
                    await txn.send_offsets_to_transaction({tp: i + 1}, s.group_id)
                eos.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                await plain.send_and_wait(s.results_topic, b"x" * 200)
                await consumer.commit({tp: i + 1})
                alo.append((time.perf_counter() - t) * 1000)
        finally:
            await consumer.stop()
            await plain.stop()
            await txn.stop()
    finally:
        broker.stop()
    out = {"machine": machine(), "n": args.n, "transaction": _pct(eos), "ack_then_commit": _pct(alo)}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "txn.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
