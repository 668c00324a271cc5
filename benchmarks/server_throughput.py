"""Throughput and time to first token of ``esamp-agents serve`` under concurrent clients, on loopback.

    python benchmarks/server_throughput.py                       # clients 1 4 8 16, 16 requests each, TTFT
    python benchmarks/server_throughput.py --clients 1 8 --reps 3 --no-ttft
    OMP_WAIT_POLICY=PASSIVE flock /tmp/esamp-model.lock python benchmarks/server_throughput.py

Starts the OpenAI-compatible server in this process on an ephemeral loopback port and talks to
it with the real ``openai`` client from threads. Two measurements:

* Throughput. For each ``--clients`` count, ``--requests`` chat completions (at least as many as
  clients) from that many threads; each request is ``n`` x ``--max-tokens`` tokens with EOS
  ignored (every request does the same work), T=0.8, a seed per request, ESamp ``--beta`` (0 =
  plain sampling). Reports completion tokens/s (sum of ``usage.completion_tokens`` over the wall
  time of the whole batch), median and p90 request latency, and the ratio to the 1-client
  tokens/s. With ``--reps`` > 1 the repetitions are the outer loop (each rep runs every client
  count, interleaved) and the numbers reported are medians over reps.
* TTFT (``--ttft``, on by default). A long request (n=1, ``--long-tokens``, EOS ignored,
  not streamed) runs in a thread; about 1 s into it a short streamed request (8 tokens) is
  sent, and the time to its first content chunk and its total time are recorded, with the
  long request's total and remaining time. The short request's TTFT sent alone is the
  reference. Three trials, medians reported. A server that decodes one request at a time
  makes the short request wait: its TTFT is about the long request's remaining time. With
  continuous batching it should be about one prefill plus a few decode steps.

Prints a markdown table and writes JSON (command, machine, date, every number) to
``benchmarks/out/server_throughput.json`` (``--out``).
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
TTFT_TRIALS = 3
SHORT_TOKENS = 8
LONG_HEAD_START_S = 1.0


def _client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_clients(url: str, clients: int, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    """``requests`` chat completions from ``clients`` threads; tokens/s over the batch and latencies."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        client = _client(url)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t = time.perf_counter()
            try:
                out = client.chat.completions.create(
                    model="embedded",
                    messages=[{"role": "user", "content": f"Write a short sentence about the number {i}."}],
                    n=args.n, max_tokens=args.max_tokens, temperature=0.8, seed=i,
                    extra_body={"beta": args.beta, "ignore_eos": True},
                )  # fmt: skip
            except Exception as exc:  # a benchmark reports failures rather than dying mid-batch
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
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
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "p90_latency_s": _quantile(latencies, 0.9) if latencies else None,
        "errors": errors,
    }


def stream_short(client: Any, seed: int, beta: float) -> dict[str, Any]:
    """A short streamed chat request: time to the first chunk, to the first content chunk, and in total."""
    t = time.perf_counter()
    first_chunk = first_content = None
    stream = client.chat.completions.create(
        model="embedded",
        messages=[{"role": "user", "content": "Say hello."}],
        n=1, max_tokens=SHORT_TOKENS, temperature=0.8, seed=seed, stream=True,
        extra_body={"beta": beta, "ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        now = time.perf_counter() - t
        if first_chunk is None:
            first_chunk = now
        if first_content is None and any(c.delta.content for c in chunk.choices):
            first_content = now
    return {"first_chunk_s": first_chunk, "ttft_s": first_content, "total_s": time.perf_counter() - t}


def ttft_trial(url: str, trial: int, args: argparse.Namespace) -> dict[str, Any]:
    """One trial: the short request alone (reference), then the short request ~1 s into a long one."""
    client = _client(url)
    alone = stream_short(client, seed=1000 + trial, beta=args.beta)

    long: dict[str, Any] = {}

    def long_request() -> None:
        t = time.perf_counter()
        long["start"] = t
        try:
            out = _client(url).chat.completions.create(
                model="embedded",
                messages=[{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
                n=1, max_tokens=args.long_tokens, temperature=0.8, seed=2000 + trial,
                extra_body={"beta": args.beta, "ignore_eos": True},
            )  # fmt: skip
            long["tokens"] = out.usage.completion_tokens
        except Exception as exc:
            long["error"] = f"{type(exc).__name__}: {exc}"
        long["end"] = time.perf_counter()

    th = threading.Thread(target=long_request)
    th.start()
    time.sleep(LONG_HEAD_START_S)
    sent = time.perf_counter()
    short = stream_short(client, seed=3000 + trial, beta=args.beta)
    th.join()
    return {
        "trial": trial,
        "alone_ttft_s": alone["ttft_s"],
        "alone_total_s": alone["total_s"],
        "short_ttft_s": short["ttft_s"],
        "short_first_chunk_s": short["first_chunk_s"],
        "short_total_s": short["total_s"],
        "long_total_s": long["end"] - long["start"],
        "long_remaining_s": long["end"] - sent,
        "short_sent_after_s": sent - long["start"],
        "long_tokens": long.get("tokens"),
        "long_error": long.get("error"),
    }


def _median(values: list[Any]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16, help="requests per client count (at least the count)")
    p.add_argument("-n", "--n", type=int, default=1, help="candidates per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.25, help="ESamp beta (0 = plain sampling)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--reps", type=int, default=1, help="repetitions (outer loop over the client counts)")
    p.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=True, help="measure TTFT under load")
    p.add_argument("--long-tokens", type=int, default=256, help="tokens of the long request in the TTFT trials")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.requests, args.n, args.max_tokens, args.reps, args.long_tokens, *args.clients) < 1:
        p.error("--requests, -n, --max-tokens, --reps, --long-tokens and --clients must all be >= 1")
    if args.beta < 0:
        p.error("--beta must be >= 0")

    loaded = load_model("embedded", device="cpu")
    runs: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    with Server(loaded, port=0) as server:
        run_clients(server.url, 1, 1, args)  # warm-up
        for rep in range(args.reps):
            for clients in args.clients:
                r = run_clients(server.url, clients, max(args.requests, clients), args)
                r["rep"] = rep
                runs.append(r)
                print(f"rep {rep} {clients:>2} client(s): {r['tokens_per_s']:.1f} completion tok/s, "
                      f"median latency {_fmt(r['median_latency_s'])} s, p90 {_fmt(r['p90_latency_s'])} s"
                      + (f", {len(r['errors'])} error(s)" if r["errors"] else ""), flush=True)  # fmt: skip
        if args.ttft:
            for trial in range(TTFT_TRIALS):
                trials.append(ttft_trial(server.url, trial, args))
                t = trials[-1]
                print(f"TTFT trial {trial}: short alone {_fmt(t['alone_ttft_s'], '.3f')} s, "
                      f"under load {_fmt(t['short_ttft_s'], '.3f')} s (long remaining "
                      f"{t['long_remaining_s']:.2f} s of {t['long_total_s']:.2f} s)", flush=True)  # fmt: skip

    rows = []
    for clients in args.clients:
        mine = [r for r in runs if r["clients"] == clients]
        rows.append(
            {
                "clients": clients,
                "requests": mine[0]["requests"],
                "reps": len(mine),
                "tokens_per_s": _median([r["tokens_per_s"] for r in mine]),
                "median_latency_s": _median([r["median_latency_s"] for r in mine]),
                "p90_latency_s": _median([r["p90_latency_s"] for r in mine]),
                "errors": sum(len(r["errors"]) for r in mine),
            }
        )
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["ratio_to_1_client"] = r["tokens_per_s"] / base if base else None

    ttft = None
    if trials:
        keys = ("alone_ttft_s", "alone_total_s", "short_ttft_s", "short_total_s", "long_total_s", "long_remaining_s")
        ttft = {k: _median([t[k] for t in trials]) for k in keys}

    print()
    print(f"n={args.n}, max_tokens={args.max_tokens}, beta={args.beta}, ignore_eos, T=0.8, reps={args.reps}")
    print()
    print("| clients | requests | completion tok/s | x 1 client | median latency s | p90 latency s | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {_fmt(r['ratio_to_1_client'])} | "
              f"{_fmt(r['median_latency_s'])} | {_fmt(r['p90_latency_s'])} | {r['errors']} |")  # fmt: skip
    if ttft is not None:
        print()
        print(f"TTFT of a {SHORT_TOKENS}-token streamed request, medians of {len(trials)} trials "
              f"(long request: {args.long_tokens} tokens, short sent ~{LONG_HEAD_START_S:.0f} s into it)")  # fmt: skip
        print()
        print("| short alone TTFT s | short under load TTFT s | short under load total s | "
              "long remaining s | long total s |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|")
        print(f"| {_fmt(ttft['alone_ttft_s'], '.3f')} | {_fmt(ttft['short_ttft_s'], '.3f')} | "
              f"{_fmt(ttft['short_total_s'])} | {_fmt(ttft['long_remaining_s'])} | "
              f"{_fmt(ttft['long_total_s'])} |")  # fmt: skip

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "runs": runs,
        "ttft": ttft,
        "ttft_trials": trials,
    }  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
