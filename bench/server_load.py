"""Load test of `mmagent serve` on loopback: concurrent clients mixing adapters, every answer checked
against the same request served alone; throughput / p50 / p99 with 1, 2 and 4 lanes against the
single-lane standard-library server this replaced (git 946ddc1) on the same greedy requests, in one run;
then greedy and seeded requests with one adapter loaded over the API mid-test, and a burst on a small
queue where 429s are intended.

    python bench/server_load.py --bundle BUNDLE            # a bundle with two or more adapters

Bounded: `--requests` per configuration (default 96), `--clients` at once (default 8), a wall-clock
limit per configuration (`--limit-s`, default 240). Exits 1 on any error but the burst's 429s, or any
answer that differs from its request served alone.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

from common import ROOT, images, machine, median, pct

BASELINE_COMMIT = "946ddc1"  # the last commit with the standard-library server


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(adapters: list[str], n_images: int = 4) -> list[dict]:
    """The distinct requests: each image x (each adapter, the router) x a question, greedy and seeded."""
    questions = ["is there a circle?", "Describe the picture.", "how many squares are there?"]
    out = []
    for i, image in enumerate(images(n_images)):
        url = data_url(image)
        for j, model in enumerate(["mmagent", *adapters]):
            body = {"model": model, "max_tokens": 24, "messages": [{"role": "user", "content": [
                {"type": "text", "text": questions[(i + j) % len(questions)]},
                {"type": "image_url", "image_url": {"url": url}}]}]}
            out.append(body)
            out.append({**body, "temperature": 1.0, "seed": 10 * i + j})  # sampled: must repeat exactly
    return out


def alone(agent, bodies: list[dict]) -> list[str]:
    """Each request's answer served alone, in process (no server, no concurrency)."""
    from mmagent.server import decode_image, parse_chat
    answers = []
    for b in bodies:
        image, text, _ = parse_chat(b)
        answers.append(agent.ask(decode_image(image, 10**8), text, None if b["model"] == "mmagent" else b["model"],
                                 b["max_tokens"], temperature=b.get("temperature", 0.0), seed=b.get("seed")).text)
    return answers


def post(conn: http.client.HTTPConnection, path: str, body: dict, method: str = "POST") -> tuple[int, dict]:
    conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def drive(url: str, bodies: list[dict], expected: list[str], n: int, clients: int, limit_s: float,
          midway=None) -> dict:
    """n requests (cycling through `bodies`) from `clients` threads with keep-alive connections; `midway`
    runs once half are done (it may add requests: returns extra (body, expected) to mix in from then on)."""
    host, port = url.removeprefix("http://").split(":")
    lock, results, counter, extra = threading.Lock(), [], [0], []
    deadline = time.monotonic() + limit_s

    def worker():
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while time.monotonic() < deadline:
            with lock:
                i = counter[0]
                counter[0] += 1
                if i >= n:
                    return
                if midway and i == n // 2:
                    extra.extend(midway())
                late = extra[(i // 3) % len(extra)] if extra and i % 3 == 0 else None  # a third go to the late ones
            body, want = late or (bodies[i % len(bodies)], expected[i % len(bodies)])
            t = time.perf_counter()
            status, reply = post(conn, "/v1/chat/completions", body)
            seconds = time.perf_counter() - t
            got = reply["choices"][0]["message"]["content"] if status == 200 else reply.get("error", {}).get("code")
            with lock:
                results.append({"status": status, "seconds": seconds, "right": status != 200 or got == want,
                                "got": got, "want": want, "model": body["model"]})

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["seconds"] for r in ok]
    return {"requests": len(results), "ok": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "p50_ms": 1e3 * median(latencies) if ok else None, "p99_ms": 1e3 * pct(latencies, 99) if ok else None,
            "status": sorted({r["status"] for r in results}), "wrong": [r for r in ok if not r["right"]],
            "n_429": sum(r["status"] == 429 for r in results),
            "other_errors": [r for r in results if r["status"] not in (200, 429)],
            "models": sorted({r["model"] for r in ok}), "latencies": latencies}


def pooled(runs: list[dict]) -> dict:
    """Rounds of one configuration: the median throughput, latencies and errors pooled."""
    latencies = [x for r in runs for x in r["latencies"]]
    return {"requests": sum(r["requests"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "req_per_s": median([r["req_per_s"] for r in runs]), "rounds": [r["req_per_s"] for r in runs],
            "p50_ms": 1e3 * median(latencies), "p99_ms": 1e3 * pct(latencies, 99),
            "n_429": sum(r["n_429"] for r in runs), "wrong": [w for r in runs for w in r["wrong"]],
            "other_errors": [e for r in runs for e in r["other_errors"]]}


def baseline_server_module() -> types.ModuleType:
    """The single-lane standard-library server as it was before this one (read from git, not copied)."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:sdk/server.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("baseline_server")
    exec(compile(source, f"{BASELINE_COMMIT}:sdk/server.py", "exec"), module.__dict__)
    return module


def serve_child(conn, bundle: str, lanes: int, queue: int, late: str | None, baseline: bool) -> None:
    """In a child process (its own GIL, as a deployed server has): load, serve on a free port, say which."""
    sys.path.insert(0, str(ROOT / "bench"))
    from mmagent import Agent
    agent = Agent.load(bundle, n_threads=1, lanes=lanes)
    if late:
        agent.unload_adapter(late)
    if baseline:
        server = baseline_server_module().serve(agent, "127.0.0.1", 0)
        conn.send(f"http://127.0.0.1:{server.server_port}")
        server.serve_forever()
    from mmagent.server import Running, Settings
    running = Running(agent, settings=Settings(queue=queue))
    conn.send(running.url)
    running.thread.join()


class Child:
    """A server in a child process, for the length of a `with`."""

    def __init__(self, bundle: Path, lanes: int = 1, queue: int = 16, late: str | None = None, baseline=False):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self.process = ctx.Process(target=serve_child, args=(theirs, str(bundle), lanes, queue, late, baseline),
                                   daemon=True)
        self.process.start()
        if not ours.poll(120):
            raise SystemExit("the server did not start within 120 s")
        self.url = ours.recv()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(30)


def run_baseline(bundle: Path, bodies, expected, args) -> dict:
    with Child(bundle, baseline=True) as server:
        return drive(server.url, bodies, expected, args.requests, args.clients, args.limit_s)


def run_lanes(bundle: Path, lanes: int, bodies, expected, args, late: str | None) -> dict:
    """The new server with `lanes` lanes; `late` is unloaded before the start and loaded over the API midway."""
    early = [(b, e) for b, e in zip(bodies, expected) if b["model"] != late]
    later = [(b, e) for b, e in zip(bodies, expected) if b["model"] == late]
    with Child(bundle, lanes, args.requests, late) as server:
        host, port = server.url.removeprefix("http://").split(":")

        def load_late():
            status, reply = post(http.client.HTTPConnection(host, int(port), timeout=60), "/v1/adapters",
                                 {"name": late})
            assert status == 200, reply
            return later

        return drive(server.url, [b for b, _ in early], [e for _, e in early], args.requests, args.clients,
                     args.limit_s, load_late if late else None)


def run_burst(bundle: Path, bodies, expected, args) -> dict:
    """Twice the clients against 2 lanes and a queue of 2: 429s are intended; every 200 must be right."""
    with Child(bundle, lanes=2, queue=2) as server:
        return drive(server.url, bodies, expected, args.requests, 2 * args.clients, args.limit_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--limit-s", type=float, default=240)
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3, help="configurations take turns, this many times each "
                    "(the median throughput is reported: fair on a machine shared with other work)")
    args = ap.parse_args()
    from mmagent import Agent
    with Agent.load(args.bundle, n_threads=1) as agent:
        adapters = agent.adapters
        late = adapters[-1] if len(adapters) > 1 else None
        bodies = workload(adapters)
        expected = alone(agent, bodies)
        if late:  # what the router picks depends on what is loaded: the mixed run keeps requests it does not change
            agent.unload_adapter(late)
            before = alone(agent, [b for b in bodies if b["model"] != late])
            agent.load_adapter(late)
    print(f"machine: {machine()}\nbundle: {args.bundle} (adapters {', '.join(adapters)}; `{late}` loaded midway)\n"
          f"{len(bodies)} distinct requests (greedy and seeded), {args.requests} per configuration, "
          f"{args.clients} clients (this process), each server in a child process, llama.cpp 1 thread per lane")
    greedy = [(b, e) for b, e in zip(bodies, expected) if "seed" not in b]
    gb, ge = [b for b, _ in greedy], [e for _, e in greedy]  # what the old server can answer (no sampling)
    configs = [("stdlib server (before), 1 lane", lambda: run_baseline(args.bundle, gb, ge, args))]
    configs += [(f"FastAPI server, {n} lane{'s' * (n > 1)}", lambda n=n: run_lanes(args.bundle, n, gb, ge, args, None))
                for n in args.lanes]
    runs: dict[str, list] = {name: [] for name, _ in configs}
    for _ in range(args.rounds):
        for name, run in configs:
            runs[name].append(run())
    rows = [(name, pooled(r)) for name, r in runs.items()]
    base = rows[0][1]["req_per_s"]
    print(f"\n{args.rounds} rounds; req/s is the median round, p50/p99 over every request of the configuration")
    print("\n| server | requests ok | req/s (rounds) | vs before | p50 ms | p99 ms | 429 | other errors | wrong answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        each = ", ".join(f"{x:.1f}" for x in r["rounds"])
        print(f"| {name} | {r['ok']}/{r['requests']} | {r['req_per_s']:.1f} ({each}) | {r['req_per_s'] / base:.2f}x | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['n_429']} | {len(r['other_errors'])} | {len(r['wrong'])} |")
    steady = iter(before if late else expected)
    kept = [(b, e) for b, e in zip(bodies, expected) if b["model"] == late or next(steady) == e]
    mix = run_lanes(args.bundle, 2, [b for b, _ in kept], [e for _, e in kept], args, late)
    print(f"\nmixed, 2 lanes: greedy and seeded requests on {', '.join(mix['models'])} (`{late}` loaded over the "
          f"API halfway): {mix['ok']}/{mix['requests']} answered, {mix['req_per_s']:.1f} req/s, p50 "
          f"{mix['p50_ms']:.0f} ms, p99 {mix['p99_ms']:.0f} ms, {len(mix['other_errors']) + mix['n_429']} errors, "
          f"{len(mix['wrong'])} wrong answers")
    rows.append(("mixed, 2 lanes", mix))
    burst = run_burst(args.bundle, bodies, expected, args)
    print(f"\nburst: {2 * args.clients} clients, 2 lanes, queue 2: {burst['ok']} answered (all checked), "
          f"{burst['n_429']} refused with 429 (intended), {len(burst['other_errors'])} other errors, "
          f"{len(burst['wrong'])} wrong answers")
    failures = [r for _, r in [*rows, ("burst", burst)] if r["wrong"] or r["other_errors"]]
    failures += [r for _, r in rows if r["n_429"]]  # the throughput runs have room for every request
    for r in failures:
        print("FAILED:", (r["wrong"] + r["other_errors"])[:3] or f"{r['n_429']} unexpected 429s", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
