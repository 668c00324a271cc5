"""Throughput of ``esamp-agents serve`` with 1 and 8 concurrent clients, on loopback.

    python benchmarks/server_throughput.py --requests 16

Starts the OpenAI-compatible server in this process on an ephemeral loopback port and sends
chat completions (``n`` candidates each, ESamp on, EOS ignored so every request does the same
work) with the real ``openai`` client from 1 and then 8 threads. Reports completion tokens per
second (from the responses' usage) and request latency medians. The server decodes one request
at a time (one engine worker; no batching across requests), so more clients queue rather than
add throughput: the number shows what the queueing costs, if anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from esamp_agents import load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.serving import Server

OUT = Path(__file__).resolve().parent / "out" / "server_throughput.json"


def run_clients(url: str, clients: int, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    from openai import OpenAI

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t = time.perf_counter()
            out = client.chat.completions.create(
                model="embedded",
                messages=[{"role": "user", "content": f"Write a short sentence about the number {i}."}],
                n=args.n, max_tokens=args.max_tokens, temperature=0.8, seed=i,
                extra_body={"beta": args.beta, "ignore_eos": True},
            )  # fmt: skip
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += out.usage.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": requests,
        "completion_tokens": tokens[0],
        "seconds": seconds,
        "tokens_per_s": tokens[0] / seconds,
        "median_latency_s": statistics.median(latencies),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16, help="requests per client setting")
    p.add_argument("-n", type=int, default=4, help="candidates per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.requests, args.n, args.max_tokens, *args.clients) < 1:
        p.error("--requests, -n, --max-tokens and --clients must all be >= 1")

    loaded = load_model("embedded", device="cpu")
    rows = []
    with Server(loaded, port=0) as server:
        run_clients(server.url, 1, 1, args)  # warm-up
        for clients in args.clients:
            rows.append(run_clients(server.url, clients, args.requests, args))
            r = rows[-1]
            print(f"{clients} client(s): {r['tokens_per_s']:.1f} completion tok/s, "
                  f"median latency {r['median_latency_s']:.2f} s", flush=True)  # fmt: skip
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
