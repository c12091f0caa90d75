"""`sdfc bench load`: a bounded loopback load test of `sdfc serve` on the tiny model.

Starts the real server as a subprocess (free loopback port, fresh data dir, Basic auth, local records),
runs N client threads for M seconds, each drawing its next request from a weighted mix (txt2img,
img2img, /sdapi/v1/progress, gallery list + download), and then checks the records room: once the
dispatcher has settled, every image a client got back must be stored exactly once (same bytes in
generated_images and in the outputs store, no extra rows). Prints a Markdown summary, writes JSON, and
exits non-zero on any client error or a failed check.

Nothing here depends on which WSGI server `sdfc serve` uses: the server is measured from outside, as a
process tree (resident memory and open file descriptors summed over its processes, from /proc).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests

from . import machine
from .models import REPO

log = logging.getLogger("bench.load")

TINY_MODELS_DIR = REPO / "tests" / "fixtures" / "models"
DEFAULT_OUT = REPO / "bench" / "out" / "load"
DEFAULT_MIX = "txt2img=40,img2img=10,progress=30,gallery=20"
OPERATIONS = ("txt2img", "img2img", "progress", "gallery")
# Routes as reported: a gallery operation is a list then (when the list is not empty) a download.
ROUTES = ("txt2img", "img2img", "progress", "gallery list", "gallery image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = (".png", ".jpg", ".webp")
ERROR_EXAMPLES = 20


# ---------------------------------------------------------------- the server, seen from outside

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """The process and all its descendants (a pre-forking server has a master and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (in parentheses) may hold spaces: the fields after its last ')' are fixed.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def snapshot(root: int) -> dict:
    """Resident memory, peak resident memory, open fds and threads, summed over the server's processes."""
    rss = hwm = fds = threads = 0
    pids = []
    for pid in process_tree(root):
        try:
            rss += _status_kib(pid, "VmRSS")
            hwm += _status_kib(pid, "VmHWM")
            threads += _status_kib(pid, "Threads")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            pids.append(pid)
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return {"processes": len(pids), "rss_mib": round(rss / 1024, 1), "peak_rss_mib": round(hwm / 1024, 1),
            "open_fds": fds, "threads": threads}


class Monitor(threading.Thread):
    """Samples the server every `interval` seconds: the highest RSS and fd count seen during the load."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.max_rss_mib, self.max_fds, self.samples = 0.0, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            snap = snapshot(self.pid)
            self.max_rss_mib = max(self.max_rss_mib, snap["rss_mib"])
            self.max_fds = max(self.max_fds, snap["open_fds"])
            self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    data_dir: Path
    log_path: Path
    auth: tuple[str, str]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sdfc.db"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def stop(self, timeout: float = 60) -> dict:
        """SIGTERM, then SIGKILL after `timeout`: how the server ended is part of the report."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return {"exit_code": self.process.returncode, "killed": True,
                        "stop_s": round(time.monotonic() - started, 2)}
        return {"exit_code": self.process.returncode, "killed": False, "stop_s": round(time.monotonic() - started, 2)}


class ServerFailed(RuntimeError):
    """`sdfc serve` did not come up as it should: nothing was measured."""


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM when the bench process dies, even by SIGKILL (a test's timeout),
    so that no server outlives its load test."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the finally in run() still stops it


def start_server(data_dir: Path, log_path: Path, models_dir: Path, server_args: list[str],
                 ready_timeout: float = 120) -> Server:
    user, password = "load", f"Load-{secrets.token_hex(8)}Z"  # meets the serve password policy
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("SDFC_DATABASE_URL", "SDFC_OUTPUTS_DIR", "SDFC_SPOOL_DIR")}  # all under the fresh dir
    env.update(SDFC_AUTH=f"{user}:{password}", SDFC_DATA_DIR=str(data_dir), SDFC_MODELS_DIR=str(models_dir),
               SDFC_DISPATCH="local", PYTHONUNBUFFERED="1")
    with log_path.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sdfc.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(port), *server_args],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_die_with_parent)
    server = Server(process, f"http://127.0.0.1:{port}", data_dir, log_path, (user, password))
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with {process.returncode}; see {log_path}")
        try:
            answer = requests.get(server.url + "/sdapi/v1/progress", auth=server.auth, timeout=2)
        except requests.RequestException:
            time.sleep(0.2)
            continue
        if answer.ok:
            return server
        server.stop()  # it answers, but not as it should: no point in loading it
        raise ServerFailed(f"server answered /sdapi/v1/progress with HTTP {answer.status_code}; see {log_path}")
    server.stop()
    raise ServerFailed(f"server did not answer in {ready_timeout:.0f} s; see {log_path}")


# ---------------------------------------------------------------- what the clients record

@dataclass
class Returned:
    sha256: str
    route: str
    request_id: str
    index: int


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROUTES})
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    returned: list[Returned] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, route: str, seconds: float) -> None:
        with self.lock:
            self.latencies[route].append(seconds)

    def error(self, route: str, seconds: float, what: str) -> None:
        with self.lock:
            self.latencies.setdefault(route, []).append(seconds)
            self.errors[route] += 1
            if len(self.examples) < ERROR_EXAMPLES:
                self.examples.append(f"{route}: {what}")

    def image(self, item: Returned) -> None:
        with self.lock:
            self.returned.append(item)


class BadAnswer(Exception):
    """A 2xx answer whose body is not what the route promises."""


def _check_status(response: requests.Response) -> None:
    if not 200 <= response.status_code < 300:
        raise BadAnswer(f"HTTP {response.status_code}: {response.text[:200]!r}")


def _decode_images(payload: dict, expected: int) -> list[bytes]:
    images = payload.get("images")
    if not isinstance(images, list) or len(images) != expected:
        raise BadAnswer(f"expected {expected} image(s), got {type(images).__name__} "
                        f"{len(images) if isinstance(images, list) else ''}")
    decoded = [base64.b64decode(i, validate=True) for i in images]
    if any(not d.startswith(PNG_SIGNATURE) for d in decoded):
        raise BadAnswer("an image is not a PNG")
    return decoded


class Client:
    """One simulated user: a keep-alive session drawing requests from the mix until the deadline."""

    def __init__(self, number: int, server: Server, args: argparse.Namespace, init_image: str, results: Results):
        self.number, self.server, self.args, self.results = number, server, args, results
        self.init_image = init_image
        # Two generators: the sequence of operations stays the same whatever the answers were.
        self.operations = random.Random(f"{args.seed}-{number}-operations")
        self.rng = random.Random(f"{args.seed}-{number}-payloads")
        self.sequence = 0
        self.session = requests.Session()
        self.session.auth = server.auth

    def run(self, deadline: float) -> None:
        operations, weights = zip(*self.args.mix.items())
        # Each operation once first (in this client's own order), so that even a short run covers every route.
        first = [op for op, weight in self.args.mix.items() if weight > 0]
        self.operations.shuffle(first)
        try:
            while time.monotonic() < deadline:
                op = first.pop(0) if first else self.operations.choices(operations, weights)[0]
                getattr(self, "_" + op)()
        except Exception as exc:  # noqa: BLE001 - a client that stops early is an error, never a silent gap
            self.results.error("client", 0.0, f"client {self.number} stopped: {type(exc).__name__}: {exc}")
        finally:
            self.session.close()

    def _timed(self, route: str, method: str, path: str, check, **kwargs):
        started = time.perf_counter()
        try:
            response = self.session.request(method, self.server.url + path, timeout=self.args.request_timeout,
                                            **kwargs)
            _check_status(response)
            value = check(response)
        except Exception as exc:  # noqa: BLE001 - any exception (a refused connection, a malformed body) is an error
            self.results.error(route, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
            return None
        self.results.ok(route, time.perf_counter() - started)
        return value

    def _generation_body(self) -> dict:
        self.sequence += 1
        # A prompt and seed of its own per request: every returned PNG (infotext included) is distinct.
        return {"prompt": f"load test client {self.number} request {self.sequence}",
                "seed": self.rng.randrange(2**31), "steps": self.args.steps, "width": self.args.side,
                "height": self.args.side, "sampler_name": "Euler", "cfg_scale": 7}

    def _keep_images(self, route: str, response: requests.Response, expected: int) -> int:
        images = _decode_images(response.json(), expected)
        request_id = response.headers.get("X-Request-Id", "")
        for index, data in enumerate(images):
            self.results.image(Returned(hashlib.sha256(data).hexdigest(), route, request_id, index))
        return len(images)

    def _txt2img(self) -> None:
        batch = self.rng.choice((1, 2))  # two images per request sometimes: image_index 1 gets recorded too
        body = {**self._generation_body(), "batch_size": batch}
        self._timed("txt2img", "POST", "/sdapi/v1/txt2img", lambda r: self._keep_images("txt2img", r, batch),
                    json=body)

    def _img2img(self) -> None:
        body = {**self._generation_body(), "init_images": [self.init_image], "denoising_strength": 0.6}
        self._timed("img2img", "POST", "/sdapi/v1/img2img", lambda r: self._keep_images("img2img", r, 1), json=body)

    def _progress(self) -> None:
        def check(response):
            if "progress" not in response.json():
                raise BadAnswer("no progress field")
        self._timed("progress", "GET", "/sdapi/v1/progress", check)

    def _gallery(self) -> None:
        def listed(response):
            items = response.json()["items"]
            if not isinstance(items, list):
                raise BadAnswer("items is not a list")
            return items
        page = self.rng.choice((1, 1, 1, 2))
        items = self._timed("gallery list", "GET", "/gallery/api/images", listed,
                            params={"page": page, "page_size": 20})
        if not items:
            return

        def downloaded(response):
            if not response.content.startswith(PNG_SIGNATURE):
                raise BadAnswer("download is not a PNG")
            with self.results.lock:
                self.results.downloaded.append(hashlib.sha256(response.content).hexdigest())
        self._timed("gallery image", "GET", self.rng.choice(items)["image_url"], downloaded)


# ---------------------------------------------------------------- the records, after the load

def pending_spool(spool_dir: Path) -> int:
    return len(list(spool_dir.glob("*.json"))) if spool_dir.is_dir() else 0


def rejected_spool(spool_dir: Path) -> int:
    rejected = spool_dir / "rejected"
    return len(list(rejected.glob("*.json"))) if rejected.is_dir() else 0


def _connect_readonly(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)


def count_rows(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    with _connect_readonly(db_path) as conn:
        try:
            return conn.execute('SELECT COUNT(*) FROM "generated_images"').fetchone()[0]
        except sqlite3.OperationalError:
            return 0  # the table is created on the writer's first use


def wait_for_records(server: Server, expected: int, timeout: float) -> float:
    """Until the spool is empty and at least `expected` rows exist (bounded); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pending_spool(server.spool_dir) == 0 and count_rows(server.db_path) >= expected:
            time.sleep(0.5)  # a row still in flight shows now, as an extra row, rather than after we looked
            return time.monotonic() - started
        time.sleep(0.2)
    return time.monotonic() - started


def stored_records(db_path: Path, outputs_dir: Path) -> list[dict]:
    """Every row with the sha256 of its image_base64 and of the outputs file it names."""
    rows = []
    with _connect_readonly(db_path) as conn:
        for record_id, request_id, index, image_b64, key in conn.execute(
                'SELECT "id", "request_id", "image_index", "image_base64", "image_key" FROM "generated_images"'):
            file_sha = None
            if key:
                try:
                    file_sha = hashlib.sha256((outputs_dir / key).read_bytes()).hexdigest()
                except OSError:
                    pass
            row_sha = hashlib.sha256(base64.b64decode(image_b64)).hexdigest() if image_b64 else None
            rows.append({"id": record_id, "request_id": request_id, "image_index": index, "sha256": row_sha,
                         "image_key": key, "file_sha256": file_sha})
    return rows


def output_files(outputs_dir: Path) -> list[str]:
    """sha256 of every image file in the outputs store (spilled events live under events/, not counted)."""
    if not outputs_dir.is_dir():
        return []
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(outputs_dir.rglob("*"))
            if p.is_file() and p.suffix in IMAGE_SUFFIXES and p.relative_to(outputs_dir).parts[0] != "events"]


def check_exactly_once(returned: list[str], rows: list[dict], files: list[str],
                       downloaded: list[str] = ()) -> dict:
    """Each returned image in exactly one row and one outputs file with the same bytes; nothing else stored.

    Every request carries its own prompt and seed, so two returned images with the same bytes would make
    the check blind: that is reported as a failure too.
    """
    want, in_rows, in_files = Counter(returned), Counter(r["sha256"] for r in rows), Counter(files)
    problems = {
        "returned_twice": sorted(s for s, n in want.items() if n > 1),
        "missing": sorted(s for s in want if in_rows[s] == 0),
        "stored_twice": sorted(s for s, n in in_rows.items() if n > 1),
        "extra_rows": sorted(str(s) for s in in_rows if s not in want),
        "file_mismatch": sorted(r["id"] for r in rows if r["file_sha256"] is None or r["file_sha256"] != r["sha256"]),
        "files_not_once": sorted(s for s in set(want) | set(in_files) if in_files[s] != 1),
        "downloads_never_returned": sorted(set(downloaded) - set(want)),
    }
    return {"ok": not any(problems.values()), "returned": len(returned), "rows": len(rows), "files": len(files),
            "downloads_checked": len(downloaded), **{k: v[:ERROR_EXAMPLES] for k, v in problems.items()},
            "counts": {k: len(v) for k, v in problems.items()}}


# ---------------------------------------------------------------- figures

def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the sample at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def route_figures(results: Results, seconds: float) -> dict:
    figures = {}
    for route in ROUTES:
        samples = results.latencies[route]
        ms = (lambda v: None if v is None else round(v * 1000, 1))
        figures[route] = {"requests": len(samples), "errors": results.errors[route],
                          "per_s": round(len(samples) / seconds, 2) if seconds else None,
                          "p50_ms": ms(percentile(samples, 0.50)), "p99_ms": ms(percentile(samples, 0.99)),
                          "max_ms": ms(max(samples) if samples else None)}
    return figures


def markdown(report: dict) -> str:
    s, m, c = report["settings"], report["machine"], report["records"]
    start, end = report["server"]["start"], report["server"]["end"]
    cpus = f"{m['usable_cpus']} usable CPUs" + (f" ({m['physical_cores']} physical cores)" if m["physical_cores"] else "")
    lines = [
        f"Measured by `{report['command']}`, {report['started']}",
        "",
        f"- Machine: {m['cpu']}, {cpus}, {m['memory_gib']} GiB RAM; {m['os']}, Python {m['python']}; "
        f"load average {report['load_average']['start']} at start, {report['load_average']['end']} at end",
        f"- Load: {s['clients']} clients × {s['seconds']:g} s over loopback (keep-alive sessions, Basic auth), mix "
        + ", ".join(f"{k} {v}%" for k, v in s["mix_percent"].items())
        + f"; generations {s['side']}x{s['side']}, {s['steps']} steps, Euler, tiny model, txt2img batch 1 or 2",
        "",
        "| route | requests | errors | req/s | p50 (ms) | p99 (ms) | max (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for route, f in report["routes"].items():
        cells = [f["requests"], f["errors"], f["per_s"], f["p50_ms"], f["p99_ms"], f["max_ms"]]
        lines.append(f"| {route} | " + " | ".join("–" if v is None else str(v) for v in cells) + " |")
    t = report["totals"]
    lines.append(f"| **all** | {t['requests']} | {t['errors']} | {t['per_s']} | | | |")
    lines += [
        "",
        "| server (all processes) | after warm-up | end | highest sampled |",
        "| --- | --- | --- | --- |",
        f"| RSS (MiB) | {start['rss_mib']} | {end['rss_mib']} | {report['server']['max_rss_mib']} |",
        f"| open fds | {start['open_fds']} | {end['open_fds']} | {report['server']['max_fds']} |",
        f"| threads | {start['threads']} | {end['threads']} | |",
        "",
        f"- Records: {c['returned']} images returned, {c['rows']} rows, {c['files']} files; "
        f"exactly once: **{'yes' if c['ok'] else 'NO'}**"
        + ("" if c["ok"] else " (" + ", ".join(f"{k} {v}" for k, v in c["counts"].items() if v) + ")")
        + f"; {c['downloads_checked']} gallery downloads, all a returned image: "
        f"{'yes' if not c['counts']['downloads_never_returned'] else 'NO'}; gallery total {c['gallery_total']}; "
        f"settled {c['settle_s']} s after the load; spool rejected {c['spool_rejected']}",
        f"- Server: {start['processes']} process(es); stopped by SIGTERM with exit code "
        f"{report['server']['stop']['exit_code']} in {report['server']['stop']['stop_s']} s"
        + (" (killed)" if report["server"]["stop"]["killed"] else "")
        + f"; tracebacks in its log: {report['server']['log_tracebacks']}",
        f"- Verdict: **{'PASS' if report['passed'] else 'FAIL'}** (0 errors and every image stored exactly once)",
    ]
    if report["error_examples"]:
        lines += ["", "Errors (first ones):", ""] + [f"- `{e}`" for e in report["error_examples"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run

def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in OPERATIONS:
            raise argparse.ArgumentTypeError(f"unknown operation {name!r}; known: {', '.join(OPERATIONS)}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: weight {weight!r} is not a number") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"{name}: weight must not be negative")
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError("the mix needs at least one positive weight")
    return mix


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdfc bench load", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=60, help="how long clients start new requests")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"operation weights (default {DEFAULT_MIX})")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per generation")
    parser.add_argument("--side", type=int, default=64, help="generated image width and height")
    parser.add_argument("--request-timeout", type=float, default=120, help="a client's patience per request (s)")
    parser.add_argument("--settle-timeout", type=float, default=60,
                        help="how long to wait for the records after the load (s)")
    parser.add_argument("--ready-timeout", type=float, default=120,
                        help="how long the server may take to answer after its start (s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds each client's choice of requests")
    parser.add_argument("--models-dir", type=Path, default=TINY_MODELS_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for load.json, load.md, server.log and the server's data dir (replaced)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for `sdfc serve` (repeatable), e.g. --server-arg=--threads=8")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be at least 1 and --seconds positive")
    return args


def warm_up(server: Server, args: argparse.Namespace, results: Results) -> str:
    """Load the model and touch every route once (not timed); returns a PNG for img2img. Its image counts."""
    session = requests.Session()
    session.auth = server.auth
    try:
        r = session.post(server.url + "/sdapi/v1/txt2img", timeout=args.request_timeout,
                         json={"prompt": "load test warm-up", "seed": 1, "steps": args.steps,
                               "width": args.side, "height": args.side, "sampler_name": "Euler"})
        _check_status(r)
        image = r.json()["images"][0]
        results.image(Returned(hashlib.sha256(base64.b64decode(image)).hexdigest(), "warm-up",
                               r.headers.get("X-Request-Id", ""), 0))
        for path in ("/sdapi/v1/progress", "/gallery/api/images"):
            _check_status(session.get(server.url + path, timeout=args.request_timeout))
        return image
    except (requests.RequestException, BadAnswer, ValueError, KeyError, IndexError) as exc:
        raise ServerFailed(f"warm-up failed: {type(exc).__name__}: {exc}") from exc
    finally:
        session.close()


def gallery_total(server: Server) -> int | None:
    try:
        r = requests.get(server.url + "/gallery/api/images", params={"page_size": 1}, auth=server.auth, timeout=30)
        return r.json().get("total") if r.ok else None
    except (requests.RequestException, ValueError):
        return None


def count_tracebacks(log_path: Path) -> int:
    try:
        return log_path.read_text(errors="replace").count("Traceback (most recent call last)")
    except OSError:
        return 0


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    server = start_server(data_dir, args.out / "server.log", args.models_dir, args.server_arg, args.ready_timeout)
    results = Results()
    try:
        init_image = warm_up(server, args, results)
        time.sleep(1)  # the warm-up's connection closes on the server's side too before we count fds
        start_snapshot = snapshot(server.process.pid)
        monitor = Monitor(server.process.pid)
        monitor.start()
        clients = [Client(n, server, args, init_image, results) for n in range(args.clients)]
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=c.run, args=(deadline,), name=f"client-{c.number}") for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            # Bounded: a request started before the deadline ends within the request timeout.
            t.join(args.seconds + args.request_timeout + 30)
        elapsed = time.monotonic() - t0
        stuck = [t.name for t in threads if t.is_alive()]
        for name in stuck:
            results.error("client", 0.0, f"{name} still waiting after the deadline and the request timeout")
        monitor.stop()
        settle_s = wait_for_records(server, len(results.returned), args.settle_timeout)
        end_snapshot = snapshot(server.process.pid)
        total_in_gallery = gallery_total(server)
        with results.lock:
            returned = [r.sha256 for r in results.returned]
            downloaded = list(results.downloaded)
        rows = stored_records(server.db_path, server.outputs_dir) if server.db_path.exists() else []
        records = check_exactly_once(returned, rows, output_files(server.outputs_dir), downloaded)
        records.update(settle_s=round(settle_s, 1), gallery_total=total_in_gallery,
                       spool_pending=pending_spool(server.spool_dir), spool_rejected=rejected_spool(server.spool_dir))
        if total_in_gallery != len(rows) or records["spool_rejected"] or records["spool_pending"]:
            records["ok"] = False
    finally:
        stop = server.stop()
    routes = route_figures(results, elapsed)
    requests_total = sum(f["requests"] for f in routes.values())
    errors_total = sum(results.errors.values())
    total_weight = sum(args.mix.values())
    report = {
        "command": shlex.join(["sdfc", "bench", "load", *argv]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "load_average": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "settings": {"clients": args.clients, "seconds": args.seconds, "steps": args.steps, "side": args.side,
                     "mix_percent": {k: round(100 * v / total_weight) for k, v in args.mix.items()},
                     "request_timeout_s": args.request_timeout, "seed": args.seed, "server_args": args.server_arg},
        "elapsed_s": round(elapsed, 1),
        "routes": routes,
        "totals": {"requests": requests_total, "errors": errors_total,
                   "per_s": round(requests_total / elapsed, 2) if elapsed else None},
        "error_examples": results.examples,
        "server": {"start": start_snapshot, "end": end_snapshot, "max_rss_mib": monitor.max_rss_mib,
                   "max_fds": monitor.max_fds, "stop": stop, "log_tracebacks": count_tracebacks(server.log_path),
                   "log": str(server.log_path)},
        "records": records,
    }
    report["passed"] = errors_total == 0 and records["ok"]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("%d clients for %g s against a fresh `sdfc serve` (output in %s)", args.clients, args.seconds, args.out)
    try:
        report = run(args, argv)
    except ServerFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("\n".join(_tail(args.out / "server.log")), file=sys.stderr)
        return 2
    text = markdown(report)
    (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "load.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / 'load.md'} and {args.out / 'load.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
