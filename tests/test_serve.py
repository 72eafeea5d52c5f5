"""xlab.serve end to end: a real server process on a free loopback port (started once for the module) over the
committed tiny checkpoint, driven by headless Chromium (the page), the openai client (the API) and raw HTTP (bad
requests, a client that goes away)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TRACEBACK, free_port, run_cli

FIXTURE = REPO / "tests" / "fixtures" / "ckpt_435677f" / "step_000003"  # max_len 32, vocab 300
CHROMIUM = "/usr/bin/chromium"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The server over the fixture checkpoint and a copy of it (ckpt2: the side-by-side view); yields its URL,
    port and model names, and checks at the end that it printed no traceback."""
    tmp = tmp_path_factory.mktemp("serve")
    second = tmp / "copy"
    shutil.copytree(FIXTURE, second)
    port, log = free_port(), tmp / "server.log"
    with log.open("w") as out:
        # fp32: these tests compare the server with one-at-a-time decoding exactly; what dtype=auto picks is
        # tests/test_precision.py's
        proc = subprocess.Popen([sys.executable, "-m", "xlab.serve", f"ckpt={FIXTURE}", f"ckpt2={second}",
                                 f"port={port}", "dtype=fp32"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            health = get(url + "/health")
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    yield {"url": url, "port": port, "models": health["models"], "log": log}
    proc.terminate()
    proc.wait(timeout=15)
    assert TRACEBACK not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def local():
    """The same checkpoint in this process, decoded by xlab.inference: what the server must reproduce."""
    from xlab.datamodules import XLabDataModule
    from xlab.generation.fast import for_inference
    from xlab.models import XLabModel

    return for_inference(XLabModel.load_from_checkpoint(FIXTURE), "fp32"), XLabDataModule.load_from_checkpoint(
        FIXTURE).tokenizer


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0)


def test_page_streams_tokens_and_shows_their_alternatives(server, tmp_path: Path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]'")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the system Chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        # a 60-token answer of the tiny model is generated in milliseconds, and on a loaded machine its events can
        # reach the page in one read; a slow emulated link makes the page receive them over ~1 s, as a real one would
        page.context.new_cdp_session(page).send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": 16384, "uploadThroughput": -1})
        page.goto(server["url"] + "/")
        page.wait_for_function("document.getElementById('models').textContent.includes('vs')")
        page.fill("#prompt", "The ")
        page.select_option("#sampler", "top_k")
        page.fill("#max_tokens", "60")
        page.fill("#seed", "7")
        page.evaluate("""() => { window.counts = [];  // each change of the token count the page went through
            new MutationObserver(() => { const out = document.getElementById('out-0');
              if (out) window.counts.push(out.querySelectorAll('.tok').length); })
            .observe(document.getElementById('columns'), {childList: true, subtree: true}); }""")
        page.click("#run")
        for i in (0, 1):
            page.wait_for_function(f"document.getElementById('status-{i}')?.textContent.includes('done')",
                                   timeout=30000)
        counts = page.evaluate("window.counts")
        assert len({c for c in counts if c > 0}) >= 2, f"the text arrived at once, not streamed: {counts}"
        texts = [page.inner_text(f"#out-{i}") for i in (0, 1)]
        assert texts[0] == texts[1] and len(texts[0]) > len("The ")  # same weights, same seed: same text
        assert page.locator("#out-0 .tok").count() == 60
        page.locator("#out-0 .tok").nth(2).hover()
        page.wait_for_selector("#tip table.alts")
        assert page.locator("#tip table.alts tr").count() == 5
        assert "p=" in page.inner_text("#tip")
        shot = Path(os.environ.get("XLAB_SCREENSHOT") or tmp_path / "serve.png")  # docs/serving.md's serve.png
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 10_000


def test_greedy_completion_is_xlab_generates(server):
    """tests/fixtures/ckpt_435677f/generate_expected.jsonl is `python -m xlab.generate ... sampler=greedy`'s output."""
    expected = json.loads((FIXTURE.parent / "generate_expected.jsonl").read_text())
    out = client(server).completions.create(model=server["models"][0], prompt=expected["prompt"], max_tokens=8,
                                            temperature=0, logprobs=2)
    assert out.choices[0].text == expected["text"]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
    assert out.usage.completion_tokens == 8


@pytest.mark.parametrize("options", [
    {"temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"sampler": "top_k", "top_k": 20, "repetition_penalty": 1.3, "seed": 11},
    {"sampler": "beam", "num_beams": 3},
])
def test_completions_match_xlab_inference(server, local, options):
    from xlab.generation.config import SamplerConfig
    from xlab.inference import generate

    model, tokenizer = local
    openai_keys = {"temperature", "top_p", "seed"}  # the rest are XLab's fields, which the client passes as extra_body
    known = {k: options[k] for k in openai_keys & set(options)}
    out = client(server).completions.create(model=server["models"][0], prompt="The list", max_tokens=12, **known,
                                            extra_body={k: v for k, v in options.items() if k not in openai_keys})
    fields = {k: v for k, v in options.items() if k not in ("seed", "sampler")}
    cfg = SamplerConfig(name=options.get("sampler", "multinomial"), **fields)
    want = generate(model, tokenizer, "The list", cfg, max_new_tokens=12, seed=options.get("seed"))
    assert out.choices[0].text == want[0].text


def test_streaming_n_echo_and_stop(server, local):
    from xlab.inference import generate

    api = client(server)
    args = {"model": server["models"][1], "prompt": ["The ", "A dict"], "max_tokens": 10, "seed": 5, "n": 2}
    whole = api.completions.create(**args, logprobs=3)
    pieces: dict[int, str] = {}
    tokens: dict[int, int] = {}
    for chunk in api.completions.create(**args, logprobs=3, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
            tokens[choice.index] = tokens.get(choice.index, 0) + (choice.logprobs is not None)
    assert [pieces[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(4)] == [len(c.logprobs.tokens) for c in whole.choices]
    model, tokenizer = local
    for i, prompt in enumerate(["The ", "A dict"]):
        for j in range(2):  # choice j of each prompt samples with seed + j
            want = generate(model, tokenizer, prompt, "multinomial", max_new_tokens=10, seed=5 + j)[0].text
            assert whole.choices[2 * i + j].text == want
    echoed = api.completions.create(model=server["models"][0], prompt="The ", max_tokens=4, seed=1, echo=True)
    assert echoed.choices[0].text.startswith("The ")
    text = api.completions.create(model=server["models"][0], prompt="The ", max_tokens=30, temperature=0).choices[0]
    stop = text.text[3:5]
    cut = api.completions.create(model=server["models"][0], prompt="The ", max_tokens=30, temperature=0, stop=stop)
    assert cut.choices[0].text == text.text[:text.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_answer_as_alone(server):
    prompts = [f"{w} " for w in ("The", "A", "def", "Return", "import", "x", "class", "for", "while", "if", "print",
                                 "hello", "os", "zip", "return", "list")]
    body = [{"model": server["models"][0], "prompt": p, "max_tokens": 12, "temperature": 0.9, "seed": i}
            for i, p in enumerate(prompts)]
    alone = [post(server["url"], b)[1]["choices"][0]["text"] for b in body]
    before = get(server["url"] + "/health")
    together: list[str | None] = [None] * len(body)
    barrier = threading.Barrier(len(body))

    def ask(i: int) -> None:
        barrier.wait()
        together[i] = post(server["url"], body[i])[1]["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    after = get(server["url"] + "/health")
    assert together == alone
    assert after["rows"] - before["rows"] == 16
    assert after["batches"] - before["batches"] < 16 and after["max_batch_rows"] > 1, (before, after)


def test_echo_logprobs_score_the_prompt_as_lm_eval_reads_them(server, local):
    """lm-eval's completions API models send echo=true, logprobs=1, max_tokens=0 or 1 and token-id prompts, and sum
    token_logprobs[ctxlen:-1]: each prompt token's log-probability given sos and the tokens before it."""
    import torch

    model, tokenizer = local
    text = "The list of"
    ids = tokenizer.encode(text)
    with torch.no_grad():
        logp = model(torch.tensor([[tokenizer.sos_id, *ids]]))[0, :-1].float().log_softmax(-1)
    expected = [logp[i, t].item() for i, t in enumerate(ids)]
    api = client(server)
    for prompt in (text, ids):
        out = api.completions.create(model=server["models"][0], prompt=prompt, max_tokens=1, temperature=0,
                                     logprobs=1, echo=True)
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids) + 1
        assert lp.token_logprobs[:-1] == pytest.approx(expected, abs=1e-4)
        assert out.choices[0].text.startswith(text) and lp.text_offset[0] == 0 and lp.text_offset[-1] == len(text)
        assert all(len(top) == 1 for top in lp.top_logprobs)
    both = api.completions.create(model=server["models"][0], prompt=[ids, ids[:2]], max_tokens=0, logprobs=2,
                                  echo=True)
    assert [c.text for c in both.choices] == [text, tokenizer.decode(ids[:2])]
    assert [len(c.logprobs.tokens) for c in both.choices] == [len(ids), 2]
    assert both.choices[1].logprobs.token_logprobs == pytest.approx(expected[:2], abs=1e-4)


BAD = [
    (b'{"prompt": "The', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "above this server's limit"),
    ({"prompt": "x", "colour": "blue"}, 400, "colour", "unknown field 'colour'"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    ({"prompt": [5, 999999]}, 400, "prompt", "prompt token ids must be a non-empty list of ids in [0, 300)"),
    ({}, 400, "prompt", "Field required"),
    ({"prompt": "word " * 100}, 400, "prompt", "context holds at most 30"),
    ({"prompt": "x", "temperature": -1.0}, 400, "temperature", "temperature=-1.0 must be >= 0.0001"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p=1.5 must be in (0, 1]"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "sampler": "beam", "num_beams": 2, "n": 3}, 400, "n", "num_return_sequences=3"),
    ({"prompt": "x", "sampler": "beam", "logprobs": 1}, 400, "logprobs", "not available with sampler=beam"),
    ({"prompt": "x", "sampler": "nucleus"}, 400, "sampler", "Input should be"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model='gpt-4' is not served here"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, None, "over this server's limit of 1048576 bytes"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD)
def test_bad_request_is_a_4xx_naming_the_field(server, body, status, param, message):
    code, reply = post(server["url"], body)
    assert code == status, reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply
    assert reply["error"]["type"]


def test_a_client_that_goes_away_frees_its_row(server):
    before = get(server["url"] + "/health")["tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    # greedy: this prompt's greedy text never reaches eos, so only the disconnect can end the row early
    body = json.dumps({"model": server["models"][0], "prompt": "The ", "max_tokens": 1000, "stream": True,
                       "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert get(server["url"] + "/health")["active_rows"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 10
    while (health := get(server["url"] + "/health"))["active_rows"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["tokens"] - before < 1000  # the abandoned row stopped before its 1000 tokens


def test_a_client_that_goes_away_before_its_answer_frees_its_row(server):
    before = get(server["url"] + "/health")["tokens"]
    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        body = json.dumps({"model": server["models"][0], "prompt": "The ", "max_tokens": 1000, "temperature": 0})
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 10
        while not get(server["url"] + "/health")["active_rows"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    while (health := get(server["url"] + "/health"))["active_rows"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["tokens"] - before < 1000


def test_remote_host_warns_and_a_taken_port_is_one_line(server):
    proc = run_cli("serve", f"ckpt={FIXTURE}", "host=0.0.0.0", "allow_remote=true", f"port={server['port']}",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert "warning: serving on host=0.0.0.0" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot listen on host=0.0.0.0 port={server['port']}" in errors[0], proc.stderr


def test_other_entry_points_do_not_import_the_server_stack():
    code = ("import sys, xlab.generate, xlab.inference, xlab.evaluate, xlab.serve, xlab.serve.__main__; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_benchmark_runs_against_the_server(server, tmp_path: Path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--url", server["url"], "--clients",
                          "1", "2", "--requests", "4", "--max-tokens", "3", "--json", str(tmp_path / "rows.json"),
                          "--worst"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["clients"] for r in rows] == [1, 2] and all(r["requests_per_s"] > 0 for r in rows)
    assert "| clients | requests |" in out.stdout
    worst = r"worst allowed request \(64 rows, max_tokens=1024\): [\d.]+ s, \d+ tokens"
    assert re.search(worst, out.stdout), out.stdout


def test_streamed_text_holds_back_split_characters_and_stop_prefixes():
    from xlab.serve.batcher import held_back

    assert held_back("ab\ufffd", []) == 1  # the rest of a multi-byte character is still to come
    assert held_back("abc\n", ["\n\n"]) == 1 and held_back("abc", ["cd", "bcx"]) == 2
    assert held_back("abc", ["xy"]) == 0 and held_back("", ["xy"]) == 0
