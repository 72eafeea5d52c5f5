"""xlab.serve under load and faults, on loopback: every bound refuses the request one past it (and serves the
largest it allows), a full queue answers 503 with Retry-After, a slow request times out, and 64 concurrent clients
mixing valid, invalid and abandoned requests for LOAD_SECONDS leave the server answering exactly what it answers
one request at a time, with /health responsive, every row freed and the peak RSS under a stated ceiling."""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, TRACEBACK, free_port
from test_serve import FIXTURE, get, post

LOAD_SECONDS = float(os.environ.get("XLAB_LOAD_SECONDS", "60"))
CLIENTS = 64
# The server's bounds in these tests: small, so that each is reached by a request that is cheap to send
BOUNDS = {"max_tokens_limit": 24, "max_request_rows": 8, "max_beams": 4, "max_queued_rows": 48,
          "max_body_bytes": 8192, "kv_cache_mb": 0.05, "request_timeout_s": 30}


def start_server(tmp: Path, **settings) -> dict:
    port, log = free_port(), tmp / "server.log"
    args = [f"{k}={v}" for k, v in {**BOUNDS, **settings}.items()]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "xlab.serve", f"ckpt={FIXTURE}", f"port={port}", "dtype=fp32",
                                 *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            get(url + "/health")
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    return {"url": url, "port": port, "proc": proc, "log": log, "idle_kb": memory_kb(proc.pid)["VmRSS"]}


def stop_server(server: dict) -> None:
    server["proc"].terminate()
    server["proc"].wait(timeout=15)
    assert TRACEBACK not in server["log"].read_text(), server["log"].read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("load"))
    yield server
    stop_server(server)


def wait_until_idle(server: dict, seconds: float = 30) -> dict:
    """/health once no row is waiting or decoding (or the last one read after `seconds`)."""
    deadline = time.monotonic() + seconds
    while (health := get(server["url"] + "/health"))["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return health


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def refused(server: dict, body: dict | bytes) -> tuple[int, str]:
    status, answer = post(server["url"], body)
    return status, answer.get("error", {}).get("message", "")


ROOM = 32 - 2  # the fixture's max_len, less sos and one new token
AT_THE_BOUND = [  # (the largest request a bound allows, the same one past it, status, words of the refusal)
    ({"prompt": "The", "max_tokens": 24}, {"max_tokens": 25}, 400, "max_tokens_limit=24"),
    ({"prompt": "The", "max_tokens": 2, "n": 8}, {"n": 9}, 400, "max_request_rows=8"),
    ({"prompt": ["The", "A"], "max_tokens": 2, "n": 4}, {"n": 5}, 400, "max_request_rows=8"),
    ({"prompt": "The", "max_tokens": 2, "sampler": "beam", "num_beams": 4}, {"num_beams": 5}, 400, "max_beams=4"),
    ({"prompt": "The", "max_tokens": 2, "logprobs": 20, "echo": True}, {"logprobs": 21}, 400, "logprobs"),
    ({"prompt": "The", "max_tokens": 2, "stop": ["x" * 256] * 16}, {"stop": ["x" * 256] * 17}, 400, "at most 16"),
    ({"prompt": "The", "max_tokens": 2, "stop": ["x" * 256]}, {"stop": ["x" * 257]}, 400, "256 characters"),
    ({"prompt": [5] * ROOM, "max_tokens": 1}, {"prompt": [5] * (ROOM + 1)}, 400, f"at most {ROOM}"),
    ({"prompt": ["a"] * 8, "max_tokens": 1}, {"prompt": ["a"] * 65}, 400, "1 to 64 prompts"),
]


@pytest.mark.parametrize(("allowed", "past", "status", "words"), AT_THE_BOUND,
                         ids=[case[3] for case in AT_THE_BOUND])
def test_each_bound_serves_its_largest_request_and_refuses_one_past_it(server, allowed, past, status, words):
    code, answer = post(server["url"], allowed)
    assert code == 200, answer
    peak, ceiling = memory_kb(server["proc"].pid)["VmHWM"], 2 * server["idle_kb"] + BOUNDS["kv_cache_mb"] * 1000
    assert peak < ceiling, (peak, ceiling)  # the largest request each bound allows stays under the stated ceiling
    code, message = refused(server, {**allowed, **past})
    assert code == status and words in message, (code, message)


def test_the_body_size_bound_and_the_kv_bound(server):
    body = json.dumps({"prompt": "The", "max_tokens": 1, "user": "u" * 8100}).encode()
    assert len(body) <= BOUNDS["max_body_bytes"] and post(server["url"], body)[0] == 200
    code, message = refused(server, json.dumps({"prompt": "The", "max_tokens": 1, "user": "u" * 8200}).encode())
    assert code == 413 and "8192 bytes" in message
    # the fixture's KV cache is 4 KiB a row (1 layer, 2 heads of 8, 32 positions, fp32): 0.05 MB holds 12 rows
    (rows,) = get(server["url"] + "/health")["batch_rows_limit"].values()
    assert rows == 12


def test_a_wide_beam_search_is_refused_for_its_kv_cache(tmp_path: Path):
    """kv_cache_mb bounds what one request needs at once: 4 beams of the fixture's context need 16 KiB."""
    server = start_server(tmp_path, kv_cache_mb=0.01)
    try:
        code, message = refused(server, {"prompt": "The", "max_tokens": 2, "sampler": "beam", "num_beams": 4})
        assert code == 400 and "kv_cache_mb=0.01" in message, message
        assert post(server["url"], {"prompt": "The", "max_tokens": 2})[0] == 200  # one row fits
    finally:
        stop_server(server)


def test_a_full_queue_answers_503_with_retry_after_and_a_slow_request_times_out(tmp_path: Path):
    server = start_server(tmp_path, max_queued_rows=8, request_timeout_s=0.3, batch_window_ms=1000)
    try:
        statuses, retry = [], []

        def one() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "The", "max_tokens": 24, "n": 4}),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            statuses.append(response.status)
            retry.append(response.getheader("Retry-After"))
            response.read()

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 503 in statuses, statuses
        assert all(r == "1" for s, r in zip(statuses, retry) if s == 503)
        assert set(statuses) <= {200, 503, 408}
        wait_until_idle(server)
        code, message = refused(server, {"prompt": "The", "max_tokens": 24, "n": 8})  # waits out a 1 s window
        assert code == 408 and "request_timeout_s=0.3" in message, (code, message)
        assert wait_until_idle(server)["active_rows"] == 0  # timed-out rows were freed
    finally:
        stop_server(server)


VALID = [  # what the clients ask, each answered once, alone, before the load
    {"prompt": "The list", "max_tokens": 12, "temperature": 0},
    {"prompt": "A dict", "max_tokens": 8, "temperature": 0.8, "seed": 7},
    {"prompt": ["Return", "The"], "max_tokens": 10, "top_p": 0.9, "seed": 3, "n": 2},
    {"prompt": "import", "max_tokens": 6, "sampler": "top_k", "top_k": 5, "seed": 11},
    {"prompt": "The", "max_tokens": 5, "sampler": "beam", "num_beams": 3, "n": 2},
    {"prompt": "x", "max_tokens": 10, "temperature": 0, "stop": ["e"], "logprobs": 2},
]
INVALID = [b'{"prompt": "The', {"prompt": "x", "max_tokens": 99}, {"prompt": "x", "bogus": 1},
           {"prompt": "x", "n": 9}, {"prompt": "x", "stop": "y" * 300}, {"prompt": "x", "temperature": "hot"}]


def texts(answer: dict) -> list[str]:
    return [c["text"] for c in answer["choices"]]


def abandon_a_stream(port: int) -> None:
    """Start a streamed request, read its first event, and hang up."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "The", "max_tokens": 24, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.fp.readline()
    conn.sock.close()


def client_loop(server: dict, expected: list[list[str]], until: float, seed: int, record: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.random()
        if kind < 0.6:
            i = rng.randrange(len(VALID))
            status, answer = post(server["url"], VALID[i])
            if status == 503:
                record["busy"] += 1
                continue
            record["valid"] += 1
            if status != 200 or texts(answer) != expected[i]:
                record["wrong"].append((i, status, answer))
        elif kind < 0.9:
            status, _ = post(server["url"], rng.choice(INVALID))
            record["invalid"] += 1
            if not 400 <= status < 500:
                record["wrong"].append(("invalid", status))
        else:
            abandon_a_stream(server["port"])
            record["abandoned"] += 1


def watch_health(server: dict, until: float, latencies: list[float]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        get(server["url"] + "/health")
        latencies.append(time.monotonic() - started)
        time.sleep(0.25)


def test_64_clients_of_valid_invalid_and_abandoned_requests(server):
    pid = server["proc"].pid
    expected = [texts(post(server["url"], body)[1]) for body in VALID]  # one at a time
    assert expected == [texts(post(server["url"], body)[1]) for body in VALID]  # and reproducible
    idle = memory_kb(pid)["VmRSS"]
    record = {"valid": 0, "invalid": 0, "abandoned": 0, "busy": 0, "wrong": []}
    latencies: list[float] = []
    until = time.monotonic() + LOAD_SECONDS
    threads = [threading.Thread(target=client_loop, args=(server, expected, until, n, record)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=watch_health, args=(server, until, latencies)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LOAD_SECONDS + 120)
    assert not record["wrong"], record["wrong"][:3]
    assert record["valid"] > CLIENTS and record["invalid"] and record["abandoned"], record
    assert max(latencies) < 5.0, max(latencies)  # /health answered throughout
    health = wait_until_idle(server)
    assert health["active_rows"] == 0 and health["cancelled_rows"] > 0, health  # abandoned rows were freed
    peak = memory_kb(pid)["VmHWM"]
    ceiling = 2 * idle + BOUNDS["kv_cache_mb"] * 1000
    print(f"load: {record['valid']} valid, {record['invalid']} invalid, {record['abandoned']} abandoned, "
          f"{record['busy']} busy in {LOAD_SECONDS:g} s; RSS idle {idle / 1e3:.0f} MB, peak {peak / 1e3:.0f} MB, "
          f"ceiling {ceiling / 1e3:.0f} MB; /health at most {max(latencies) * 1e3:.0f} ms")
    assert peak < ceiling, (peak, ceiling)
