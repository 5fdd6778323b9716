"""The capacity assignor on a GPU host: one minilm worker on the GPU, one on the CPU, one group.

Each worker measures its own speed at start-up (minilm at its batch size) and advertises it; the
leader splits the partitions in proportion. Prints and writes what each member advertised and
got, from the workers' own logs (Tansu's DescribeGroups leaves out member metadata, so
`streamer status` cannot show it there). Broker: Tansu (the GPU host has no Java). Random weights with the
real architecture (STREAMER_MINILM_DIR + STREAMER_MINILM_RANDOM_WEIGHTS=1, as bench/gpu/run.sh sets).

Usage: python bench/gpu_assign.py [--partitions 12] [--devices cuda,cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer import WorkerSettings, kafka  # noqa: E402
from streamer.config import settings_env  # noqa: E402
from streamer.testing import TansuBroker  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--devices", default="cuda,cpu", help="one worker per device")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_assign.json"))
    args = ap.parse_args()
    os.environ["STREAMER_IDEMPOTENCE"] = "false"
    broker = TansuBroker().start()
    tag = uuid.uuid4().hex[:6]
    ws = WorkerSettings(bootstrap_servers=broker.bootstrap_servers, request_topic=f"g-{tag}.req",
                        group_id=f"g-{tag}", model="minilm", assignor="capacity", max_batch_size=128,
                        idempotence=False)
    procs = []
    logs: dict[str, Path] = {}
    try:
        await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, args.partitions)])
        for i, device in enumerate(args.devices.split(",")):
            name = f"{device.replace(':', '')}-{i}"
            env = {**os.environ, **settings_env(ws), "STREAMER_DEVICE": device, "STREAMER_CLIENT_ID": name,
                   "STREAMER_GROUP_INSTANCE_ID": name}
            log = Path(tempfile.gettempdir()) / f"gpu-assign-{tag}-{name}.log"
            logs[name] = log
            with log.open("wb") as f:
                procs.append(await asyncio.create_subprocess_exec(sys.executable, "-m", "streamer", "worker", env=env,
                                                                  stdout=f, stderr=asyncio.subprocess.STDOUT))
        await kafka.wait_for_group(ws, ws.group_id, len(procs), timeout_s=240)
        for _ in range(120):  # every worker has logged its capacity and its assignment
            if all("capacity" in log.read_text() and "partitions assigned" in log.read_text() for log in logs.values()):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        members = []
        for name, log in logs.items():
            text = log.read_text()
            capacity = re.findall(r"capacity ([\d,.]+) items/s", text)
            assigned = re.findall(r"partitions assigned: \[(.*)\]", text)
            members.append({"worker": name, "capacity_items_per_s": float(capacity[-1].replace(",", "")) if capacity
                            else None, "partitions": len(assigned[-1].split(",")) if assigned and assigned[-1] else 0})
        _write(Path(args.out), {"partitions": args.partitions, "batch": ws.max_batch_size, "members": members})
    finally:
        for p in procs:
            p.terminate()
        await asyncio.gather(*(p.wait() for p in procs))
        broker.stop()


def _write(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
