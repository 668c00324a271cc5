"""A bounded soak test of ``esamp-agents serve`` on loopback: many mixed requests, then is it still healthy?

    python benchmarks/serve_soak.py                                   # 200 requests, 8 clients, <= 600 s
    python benchmarks/serve_soak.py --requests 30 --clients 4 --max-seconds 240
    OMP_WAIT_POLICY=PASSIVE flock /tmp/esamp-model.lock python benchmarks/serve_soak.py

Starts the OpenAI-compatible server in this process on an ephemeral loopback port and sends
``--requests`` requests from ``--clients`` threads with the real ``openai`` client, a mix drawn
from ``--seed``: chat and text completions (``/v1/chat/completions``, ``/v1/completions``),
n in {1, 2, 4}, max_tokens 1..48, streamed or not, ESamp on (beta 0.25) or off (beta 0), some
with logprobs (chat ``top_logprobs``, completions ``logprobs=k``), some with stop strings, some
streams asking for usage; about 10% are streams the client closes after the first chunk (a
disconnect mid-stream, which must cancel the job) and about 3% are invalid requests that must
get a 400. No new request starts after ``--max-seconds``.

Answers are validated lightly: ``choices`` has length n with indices 0..n-1, finish reasons
are ``stop`` or ``length``, stop strings do not appear in the text, logprobs are there when
asked for, usage fits n x max_tokens; for streams, every chunk's ``choices[i].index`` is in
range and each index gets exactly one final ``finish_reason``.

Records per-kind counts, latencies and completion tokens (from ``usage``: streams count only
when they asked for ``include_usage``, disconnects never), errors (any exception, unexpected status or failed
check), lost requests (sent but never answered or finished), ``/metrics`` before and after,
the process's RSS at the start, after the first 20 requests (warm), after each quarter of the
requests and at the end (each quarter and the end also after glibc's ``malloc_trim``, which
separates memory still held from pages the allocator kept); then
``GET /health`` must answer ok, the server must be idle (no rows in flight, empty queue) and a
final plain request must succeed. Prints a summary table, writes JSON to
``benchmarks/out/serve_soak.json`` (``--out``) and exits 1 if anything failed or was lost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from esamp_agents import load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.serving import Server

OUT = Path(__file__).resolve().parent / "out" / "serve_soak.json"
WARM_AFTER = 20
REQUEST_TIMEOUT_S = 180.0
IDLE_WAIT_S = 15.0

CHAT_PROMPTS = (
    "Write a short sentence about the sea.",
    "What is 2 + 2? Answer briefly.",
    "Name three colours.",
    "Give me a tip for learning Python.",
    "Describe a cat in one line.",
    "Tell me a fact about the moon.",
)
TEXT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):\n",
    "The three primary colours are",
    "In 1969, the first humans",
)
STOPS = ((".",), ("\n",), (".", "\n"), ("the", "and"), ("!", "?", ",", ";"))
INVALID = (
    {"n": 0},
    {"temperature": 3.5},
    {"extra_body": {"not_a_field": 1}},
    {"max_tokens": 0},
)


# --------------------------------------------------------------------------- the plan


def plan(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` request specs drawn from ``seed`` (the mix described in the module docstring)."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        roll = rng.random()
        kind = "disconnect" if roll < 0.10 else "invalid" if roll < 0.13 else "normal"
        endpoint = rng.choice(("chat", "completion"))
        stream = kind == "disconnect" or rng.random() < 0.5
        spec: dict[str, Any] = {
            "id": i,
            "endpoint": endpoint,
            "stream": stream,
            "disconnect": kind == "disconnect",
            "invalid": None,
            "n": rng.choice((1, 2, 4)),
            "max_tokens": rng.randint(16, 48) if kind == "disconnect" else rng.randint(1, 48),
            "beta": rng.choice((0.25, 0.0)),
            "temperature": rng.choice((0.7, 1.0)),
            "seed": rng.randrange(1 << 31),
            "logprobs": rng.random() < 0.3,
            "top_logprobs": rng.choice((0, 2, 5)),
            "stop": list(rng.choice(STOPS)) if rng.random() < 0.3 else None,
            "include_usage": stream and rng.random() < 0.5,
            "prompt": rng.choice(CHAT_PROMPTS if endpoint == "chat" else TEXT_PROMPTS),
        }
        if kind == "invalid":
            spec["invalid"] = rng.choice(INVALID)
            spec["stream"] = spec["include_usage"] = False
        spec["kind"] = (
            "disconnect"
            if spec["disconnect"]
            else "invalid"
            if spec["invalid"]
            else f"{endpoint}/{'stream' if spec['stream'] else 'plain'}"
        )
        specs.append(spec)
    return specs


def _request_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "model": "embedded",
        "n": spec["n"],
        "max_tokens": spec["max_tokens"],
        "temperature": spec["temperature"],
        "seed": spec["seed"],
        "extra_body": {"beta": spec["beta"]},
    }
    if spec["endpoint"] == "chat":
        kw["messages"] = [{"role": "user", "content": spec["prompt"]}]
        if spec["logprobs"]:
            kw["logprobs"] = True
            kw["top_logprobs"] = spec["top_logprobs"]
    else:
        kw["prompt"] = spec["prompt"]
        if spec["logprobs"]:
            kw["logprobs"] = spec["top_logprobs"]
    if spec["stop"]:
        kw["stop"] = spec["stop"]
    if spec["stream"]:
        kw["stream"] = True
        if spec["include_usage"]:
            kw["stream_options"] = {"include_usage": True}
    for key, value in (spec["invalid"] or {}).items():
        if key == "extra_body":
            kw["extra_body"] = {**kw["extra_body"], **value}
        else:
            kw[key] = value
    return kw


# --------------------------------------------------------------------------- checks


class CheckFailed(Exception):
    """An answer that does not look like what was asked for."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _check_text(spec: dict[str, Any], index: int, text: str | None) -> None:
    _check(isinstance(text, str), f"choice {index}: text is {text!r}, not a string")
    for s in spec["stop"] or ():
        _check(s not in text, f"choice {index}: stop string {s!r} in the text {text!r}")


def check_plain(spec: dict[str, Any], out: Any) -> int:
    """Validate a non-streamed answer; returns its completion tokens."""
    n = spec["n"]
    _check(len(out.choices) == n, f"{len(out.choices)} choices for n={n}")
    _check(sorted(c.index for c in out.choices) == list(range(n)), f"indices {[c.index for c in out.choices]}")
    for c in out.choices:
        _check(c.finish_reason in ("stop", "length"), f"choice {c.index}: finish_reason {c.finish_reason!r}")
        text = c.message.content if spec["endpoint"] == "chat" else c.text
        _check_text(spec, c.index, text)
        if spec["logprobs"]:
            _check(c.logprobs is not None, f"choice {c.index}: logprobs asked for, none returned")
            if spec["endpoint"] == "chat":
                for entry in c.logprobs.content or ():
                    got, want = len(entry.top_logprobs), spec["top_logprobs"]
                    _check(got == want, f"choice {c.index}: {got} top_logprobs, asked for {want}")
            else:
                lp = c.logprobs
                _check(len(lp.tokens or ()) == len(lp.token_logprobs or ()), f"choice {c.index}: ragged logprobs")
    usage = out.usage
    _check(usage is not None, "no usage")
    tokens, most = usage.completion_tokens, n * spec["max_tokens"]
    _check(0 <= tokens <= most, f"usage.completion_tokens={tokens} over n x max_tokens = {most}")
    return int(usage.completion_tokens)


def consume_stream(spec: dict[str, Any], stream: Any, t0: float, rec: dict[str, Any]) -> int:
    """Read (or, for a disconnect, abandon) a stream, validating each chunk; returns completion tokens (usage)."""
    n = spec["n"]
    texts = [""] * n
    finished: Counter[int] = Counter()
    tokens = 0
    chunks = 0
    saw_usage = False
    for chunk in stream:
        chunks += 1
        if rec.get("first_chunk_s") is None:
            rec["first_chunk_s"] = time.perf_counter() - t0
        if spec["disconnect"]:
            stream.close()  # the client goes away mid-stream
            rec["chunks"] = chunks
            return 0
        for c in chunk.choices:
            _check(0 <= c.index < n, f"chunk choice index {c.index} outside 0..{n - 1}")
            _check(finished[c.index] == 0, f"choice {c.index}: a chunk after its finish_reason")
            piece = c.delta.content if spec["endpoint"] == "chat" else c.text
            texts[c.index] += piece or ""
            if c.finish_reason is not None:
                _check(c.finish_reason in ("stop", "length"), f"choice {c.index}: finish_reason {c.finish_reason!r}")
                finished[c.index] += 1
        if getattr(chunk, "usage", None) is not None:
            saw_usage = True
            tokens = int(chunk.usage.completion_tokens)
    rec["chunks"] = chunks
    missing = [i for i in range(n) if finished[i] != 1]
    _check(not missing, f"choices {missing} got no final finish_reason")
    for i, text in enumerate(texts):
        _check_text(spec, i, text)
    if spec["include_usage"]:
        _check(saw_usage, "include_usage asked for, no usage chunk")
        _check(tokens <= n * spec["max_tokens"], f"usage.completion_tokens={tokens} over n x max_tokens")
    return tokens


# --------------------------------------------------------------------------- running


def send(client: Any, spec: dict[str, Any], rec: dict[str, Any]) -> None:
    """Send one request and fill ``rec`` with its outcome (``ok``, ``expected_error``, ``error``, ``lost``)."""
    import openai

    kw = _request_kwargs(spec)
    api = client.chat.completions if spec["endpoint"] == "chat" else client.completions
    t0 = time.perf_counter()
    rec["state"] = "sent"
    try:
        out = api.create(**kw)
        if spec["invalid"]:
            rec["outcome"] = "error"
            rec["error"] = f"invalid request {spec['invalid']} was answered, expected a 400"
        elif spec["stream"]:
            rec["completion_tokens"] = consume_stream(spec, out, t0, rec)
            rec["outcome"] = "ok"
        else:
            rec["completion_tokens"] = check_plain(spec, out)
            rec["outcome"] = "ok"
    except openai.APIStatusError as exc:
        if spec["invalid"] and exc.status_code == 400:
            rec["outcome"] = "expected_error"
        else:
            rec["outcome"] = "error"
            rec["error"] = f"HTTP {exc.status_code}: {exc.message}"
    except openai.APITimeoutError as exc:
        rec["outcome"] = "lost"
        rec["error"] = f"no answer within {REQUEST_TIMEOUT_S:.0f} s ({type(exc).__name__})"
    except CheckFailed as exc:
        rec["outcome"] = "error"
        rec["error"] = f"check failed: {exc}"
    except Exception as exc:
        rec["outcome"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["latency_s"] = time.perf_counter() - t0
    rec["state"] = "done"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                continue
    return values


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return -1


def trimmed_rss_bytes() -> int:
    """RSS after asking glibc to hand freed heap pages back (so growth left is memory still held,
    not allocator retention); plain RSS where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=600.0, help="no new request starts after this")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.requests, args.clients) < 1 or args.max_seconds <= 0:
        p.error("--requests and --clients must be >= 1 and --max-seconds > 0")

    import httpx
    from openai import OpenAI

    specs = plan(args.requests, args.seed)
    records: list[dict[str, Any]] = [
        {"id": s["id"], "kind": s["kind"], "state": "planned", "outcome": None} for s in specs
    ]
    rss: dict[str, int] = {"start": rss_bytes()}
    lock = threading.Lock()
    next_index = [0]
    finished = [0]
    failures: list[str] = []
    quarters = {len(specs) * q // 4 for q in (1, 2, 3)} - {0}

    loaded = load_model("embedded", device="cpu")
    rss["loaded"] = rss_bytes()
    with Server(loaded, port=0) as server:
        root = server.url.removesuffix("/v1")
        http = httpx.Client(base_url=root, timeout=30)
        metrics_before = parse_metrics(http.get("/metrics").text)
        start = time.perf_counter()
        deadline = start + args.max_seconds

        def worker() -> None:
            client = OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
            while True:
                with lock:
                    if next_index[0] >= len(specs) or time.perf_counter() > deadline:
                        return
                    i = next_index[0]
                    next_index[0] += 1
                send(client, specs[i], records[i])
                with lock:
                    finished[0] += 1
                    if finished[0] == WARM_AFTER:
                        rss["warm"] = rss_bytes()
                    done = finished[0]
                    if done in quarters:
                        rss[f"after {done}"] = rss_bytes()
                        rss[f"after {done} trimmed"] = trimmed_rss_bytes()
                rec = records[i]
                if rec["outcome"] in ("error", "lost"):
                    print(f"  request {i} ({rec['kind']}): {rec['outcome']}: {rec.get('error')}", flush=True)
                if done % 10 == 0:
                    print(f"  {done}/{len(specs)} done, {time.perf_counter() - start:.0f} s", flush=True)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(0.0, deadline - time.perf_counter()) + REQUEST_TIMEOUT_S + 10)
        seconds = time.perf_counter() - start
        stuck_threads = sum(th.is_alive() for th in threads)
        rss["end"] = rss_bytes()
        rss["end trimmed"] = trimmed_rss_bytes()
        for rec in records:
            if rec["state"] == "sent":  # sent, never finished
                rec["outcome"] = "lost"
                rec["error"] = "never finished"
            elif rec["state"] == "planned":
                rec["outcome"] = "skipped"  # not sent: --max-seconds ran out

        # The server afterwards: idle, healthy, and still serving.
        idle_deadline = time.monotonic() + IDLE_WAIT_S
        while True:
            metrics_after = parse_metrics(http.get("/metrics").text)
            busy = metrics_after.get("esamp_rows_in_flight", 0) + metrics_after.get("esamp_queue_depth", 0)
            if busy == 0 or time.monotonic() > idle_deadline:
                break
            time.sleep(0.2)
        if busy:
            failures.append(f"server not idle {IDLE_WAIT_S:.0f} s after the run: "
                            f"rows_in_flight={metrics_after.get('esamp_rows_in_flight')}, "
                            f"queue_depth={metrics_after.get('esamp_queue_depth')}")  # fmt: skip
        health = http.get("/health")
        health_ok = health.status_code == 200 and health.json().get("status") == "ok"
        if not health_ok:
            failures.append(f"/health answered {health.status_code}: {health.text[:200]}")
        final_ok = False
        try:
            out = OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60).chat.completions.create(
                model="embedded", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, seed=0
            )
            final_ok = len(out.choices) == 1 and isinstance(out.choices[0].message.content, str)
            if not final_ok:
                failures.append(f"final request answered oddly: {out}")
        except Exception as exc:
            failures.append(f"final request failed: {type(exc).__name__}: {exc}")
        http.close()

    outcomes = Counter(rec["outcome"] for rec in records)
    kinds = sorted({rec["kind"] for rec in records})
    by_kind = {}
    for kind in kinds:
        mine = [rec for rec in records if rec["kind"] == kind]
        lat = [rec["latency_s"] for rec in mine if rec["outcome"] in ("ok", "expected_error")]
        by_kind[kind] = {
            "count": len(mine),
            **{
                o: sum(rec["outcome"] == o for rec in mine)
                for o in ("ok", "expected_error", "error", "lost", "skipped")
            },
            "median_latency_s": _median(lat),
            "max_latency_s": max(lat) if lat else None,
            "median_first_chunk_s": _median([rec["first_chunk_s"] for rec in mine if rec.get("first_chunk_s")]),
            "completion_tokens": sum(rec.get("completion_tokens", 0) for rec in mine),
        }
    features = {
        "n": dict(sorted(Counter(s["n"] for s in specs).items())),
        "esamp_on": sum(s["beta"] > 0 for s in specs),
        "esamp_off": sum(s["beta"] == 0 for s in specs),
        "logprobs": sum(s["logprobs"] for s in specs),
        "stop": sum(bool(s["stop"]) for s in specs),
        "include_usage": sum(s["include_usage"] for s in specs),
    }
    delta = {
        k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0)
        for k in sorted(set(metrics_before) | set(metrics_after))
        if k.startswith(("esamp_requests_total", "esamp_generated_tokens_total"))
    }
    errors = [
        f"request {rec['id']} ({rec['kind']}): {rec.get('error')}" for rec in records if rec["outcome"] == "error"
    ]
    lost = [f"request {rec['id']} ({rec['kind']}): {rec.get('error')}" for rec in records if rec["outcome"] == "lost"]
    if stuck_threads:
        failures.append(f"{stuck_threads} client thread(s) still running at the end")
    passed = not errors and not lost and not failures

    mib = 1024 * 1024
    print()
    print(f"{len(specs)} requests planned, {args.clients} clients, {seconds:.1f} s, seed {args.seed}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0]))))  # fmt: skip
    print()
    print("| kind | count | ok | expected 400 | errors | lost | skipped | median latency s | max latency s "
          "| median first chunk s | usage completion tokens |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in by_kind.items():
        print(f"| {kind} | {r['count']} | {r['ok']} | {r['expected_error']} | {r['error']} | {r['lost']} | "
              f"{r['skipped']} | {_fmt(r['median_latency_s'])} | {_fmt(r['max_latency_s'])} | "
              f"{_fmt(r['median_first_chunk_s'], '.3f')} | {r['completion_tokens']} |")  # fmt: skip
    print()
    print(f"mix: n {features['n']}, ESamp on {features['esamp_on']} / off {features['esamp_off']}, "
          f"logprobs {features['logprobs']}, stop strings {features['stop']}, "
          f"include_usage {features['include_usage']}")  # fmt: skip
    print("RSS MiB: " + ", ".join(f"{k} {v / mib:.0f}" for k, v in rss.items()))
    print("metrics delta: " + ", ".join(f"{k} {v:g}" for k, v in delta.items() if v))
    print(f"after: /health ok={health_ok}, rows_in_flight={metrics_after.get('esamp_rows_in_flight')}, "
          f"queue_depth={metrics_after.get('esamp_queue_depth')}, final request ok={final_ok}")  # fmt: skip
    for line in errors + lost + failures:
        print(f"FAIL {line}")
    print("PASS" if passed else f"FAIL: {len(errors)} error(s), {len(lost)} lost, {len(failures)} other")

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": seconds,
        "passed": passed,
        "outcomes": dict(outcomes),
        "by_kind": by_kind,
        "features": features,
        "rss_bytes": rss,
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
        "metrics_delta": delta,
        "health_ok": health_ok,
        "final_request_ok": final_ok,
        "errors": errors,
        "lost": lost,
        "failures": failures,
        "requests": [{**spec, **rec} for spec, rec in zip(specs, records, strict=True)],
    }  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
