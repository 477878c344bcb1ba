"""Black-box methods against a prediction endpoint: the audit's speed side by side with the
endpoint's own throughput, the floor for any black box (not run in CI).

    python benchmarks/endpoint.py [--images 10] [--methods occlusion,lime,anchor,lore]

The endpoint is the test suite's real HTTP server (tests/transforms/test_endpoint.py: the reference CNN
behind KServe v2 on 127.0.0.1, no faults), in this process. First its floor: images per second
it answers when asked by 4 threads in requests of 32 images (the job's defaults), for about
10 s. Then one audit per method of the first --images demo digits through it (one torch
thread, metrics off, so the method's own calls are all that is asked). Figures per method:
wall seconds of the job (preflight apart), images sent per digit (the manifest's model_calls), the images per second the
audit drew from the endpoint, and that over the floor: how much of the endpoint the method
keeps busy. A Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from saliency_audit.pipelines import audit  # noqa: E402
from saliency_audit.pipelines.cli import DEMO_SHARD  # noqa: E402


def floor(base: str, seconds: float = 10.0, threads: int = 4, batch: int = 32) -> float:
    """Images per second the endpoint answers, asked as the job asks it."""
    body = json.dumps({"inputs": [{"name": "images", "shape": [batch, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.5] * (batch * 28 * 28)}]}).encode()
    done, stop = [0], time.monotonic() + seconds

    def ask():
        while time.monotonic() < stop:
            request = urllib.request.Request(f"{base}/v2/models/cnn/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            done[0] += batch

    start = time.monotonic()
    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0] / (time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    from test_endpoint import Endpoint
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--methods", default="occlusion,lime,anchor,lore")
    args = parser.parse_args(argv)
    server = Endpoint()
    try:
        ceiling = floor(server.base)
        print(f"endpoint floor: {ceiling:.0f} images/s (4 threads x 32 images per request)\n")
        print("| method | seconds | images sent per digit | images/s drawn | share of the floor |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as scratch:
            for method in args.methods.split(","):
                plan = audit.plan(["--input", str(DEMO_SHARD), "--model", f"{server.base}/v2/models/cnn",
                                   "--methods", method, "--channels", "1", "--limit-per-shard", str(args.images),
                                   "--torch-threads", "1", "--no-metrics", "--output", f"{scratch}/{method}"])
                start = time.perf_counter()  # the job, not preflight
                manifest, _ = audit.run_plan(plan)
                seconds = time.perf_counter() - start
                calls = manifest["model_calls"]["methods"][method]
                drawn = manifest["model_calls"]["all"]["images"] / seconds
                print(f"| {method} | {seconds:.1f} | {calls['images_per_image']} | {drawn:.0f} | "
                      f"{drawn / ceiling:.2f} |")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
