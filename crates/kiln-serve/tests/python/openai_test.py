"""`kiln serve` on an `[llm]` model driven by the official `openai` Python client, unmodified, over a
real socket: the 30-layer SmolLM2-135M-Instruct that `models/fetch.sh --llm` builds answers
"What is the capital of France?" with Paris, streamed and not (same text); legacy completions;
a client that closes its stream mid-answer gets its request aborted and its KV blocks returned
(checked on /metrics); bad requests raise the client's typed errors; SIGTERM exits 0.

    python crates/kiln-serve/tests/python/openai_test.py path/to/kiln MODELS_DIR

MODELS_DIR is what models/fetch.sh --llm printed (MODELS_DIR/llm/smollm2-135m/ holds the model).
Needs the venv from `scripts/setup-python.sh serve`. Prints timings and 'N passed, M failed';
exits non-zero on failure.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
SHIPPED_CONFIG = os.path.join(ROOT, "models", "repository-llm", "smollm2", "config.toml")
FILES = ["model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LOAD_TIMEOUT_S = float(os.environ.get("KILN_OPENAI_TEST_LOAD_TIMEOUT", "600"))


def make_repo(models_dir):
    """A temporary repository: model `smollm2`, version 1 linking to the fetched 30-layer model, with
    the shipped models/repository-llm/smollm2/config.toml (256 MiB KV cache, max_model_len 4096)."""
    src = os.path.join(models_dir, "llm", "smollm2-135m")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise SystemExit(f"openai_test: {src} lacks {missing} (run models/fetch.sh --llm)")
    repo = tempfile.mkdtemp(prefix="kiln-openai-test-")
    v1 = os.path.join(repo, MODEL, "1")
    os.makedirs(v1)
    for f in FILES:
        os.symlink(os.path.join(src, f), os.path.join(v1, f))
    shutil.copyfile(SHIPPED_CONFIG, os.path.join(repo, MODEL, "config.toml"))
    return repo


def start(kiln, repo, log):
    """Start the server on free ports; wait for /v2/health/ready and the model's own ready endpoint
    (the server says ready even when the model failed to load). Returns (proc, http, metrics, s)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [kiln, "serve", "--model-repository", repo, "--host", "127.0.0.1", "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", "--poll-interval-secs", "0"],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
    )
    # "kiln serve: http HOST:PORT grpc HOST:PORT metrics HOST:PORT", printed once the ports are bound
    line = [None]
    reader = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(LOAD_TIMEOUT_S)
    words = (line[0] or "").split()
    if len(words) < 8:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"kiln serve did not start within {LOAD_TIMEOUT_S:.0f} s (said {line[0]!r})")
    http_addr, metrics_addr = words[3], words[7]
    while True:
        try:
            if urllib.request.urlopen(f"http://{http_addr}/v2/health/ready", timeout=5).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode} before it was ready")
        if time.monotonic() - t0 > LOAD_TIMEOUT_S:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"kiln serve not ready after {LOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    try:
        urllib.request.urlopen(f"http://{http_addr}/v2/models/{MODEL}/ready", timeout=5)
    except urllib.error.HTTPError as e:
        proc.terminate()
        proc.wait()
        raise RuntimeError(f"the server is ready but model {MODEL} is not ({e.code}; its log below)") from None
    return proc, http_addr, metrics_addr, time.monotonic() - t0


def engine_stat(metrics_addr, stat):
    """kiln_llm:engine{model="smollm2",stat=STAT,version="1"} from /metrics (labels in any order)."""
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if not line.startswith("kiln_llm:engine{"):
            continue
        labels, _, value = line.rpartition(" ")
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if got.get("model") == MODEL and got.get("stat") == stat and got.get("version") == "1":
            return float(value)
    raise AssertionError(f"no kiln_llm:engine stat {stat!r} for {MODEL} on /metrics")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    kiln, models_dir = sys.argv[1], sys.argv[2]
    print(f"openai {openai.__version__}, kiln {kiln}, model {models_dir}/llm/smollm2-135m")
    t_all = time.monotonic()
    repo = make_repo(models_dir)
    log = tempfile.TemporaryFile(mode="w+")
    results = []

    def check(name, fn):
        t = time.monotonic()
        try:
            fn()
            results.append((name, None))
            print(f"ok      {name} ({time.monotonic() - t:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            results.append((name, traceback.format_exc()))
            print(f"FAILED  {name} ({time.monotonic() - t:.1f} s)\n{traceback.format_exc()}", flush=True)

    proc = None
    try:
        proc, http_addr, metrics_addr, load_s = start(kiln, repo, log)
        print(f"        load: ready after {load_s:.1f} s (http {http_addr}, metrics {metrics_addr})", flush=True)
        client = openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key="none", max_retries=0, timeout=600)
        answer = {}

        def models():
            ids = [m.id for m in client.models.list()]
            assert MODEL in ids, ids

        def chat():
            t = time.monotonic()
            r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
            dt = time.monotonic() - t
            assert r.object == "chat.completion" and r.model == MODEL, (r.object, r.model)
            assert len(r.choices) == 1, r.choices
            c = r.choices[0]
            assert c.message.role == "assistant", c.message.role
            content = c.message.content
            print(f"        first answer: {dt:.1f} s, {r.usage.completion_tokens} tokens, "
                  f"finish_reason {c.finish_reason}: {content!r}", flush=True)
            assert "Paris" in content, content
            u = r.usage
            assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 20, u
            assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
            assert c.finish_reason in ("stop", "length"), c.finish_reason
            if c.finish_reason == "length":
                assert u.completion_tokens == 20, u
            answer.update(content=content, usage=u, finish=c.finish_reason)

        def chat_stream():
            t = time.monotonic()
            first_s, deltas, roles, finish, usage = None, [], [], None, None
            stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20,
                                                    stream=True, stream_options={"include_usage": True})
            for ch in stream:
                assert ch.object == "chat.completion.chunk", ch.object
                if ch.usage is not None:
                    usage = ch.usage
                for c in ch.choices:
                    if c.delta.role:
                        roles.append(c.delta.role)
                    if c.delta.content:
                        if first_s is None:
                            first_s = time.monotonic() - t
                        deltas.append(c.delta.content)
                    if c.finish_reason:
                        finish = c.finish_reason
            text = "".join(deltas)
            print(f"        streamed: first token after {first_s:.2f} s, {len(deltas)} deltas in "
                  f"{time.monotonic() - t:.1f} s: {text!r}", flush=True)
            assert "Paris" in text, text
            assert roles == ["assistant"], roles
            assert "content" in answer, "the non-streamed answer failed"
            assert text == answer["content"], (text, answer["content"])
            assert finish == answer["finish"], (finish, answer["finish"])
            assert usage is not None, "no usage chunk with stream_options.include_usage"
            w = answer["usage"]
            assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
                (w.prompt_tokens, w.completion_tokens, w.total_tokens), (usage, w)

        def completions():
            r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
            assert r.object == "text_completion" and len(r.choices) == 1, r
            c = r.choices[0]
            print(f"        completion: {c.text!r} ({c.finish_reason})", flush=True)
            assert c.text.strip(), c
            assert c.finish_reason in ("stop", "length"), c.finish_reason
            assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens >= 5, r.usage
            s = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                          max_tokens=8, stream=True)
            streamed = "".join(ch.choices[0].text for ch in s if ch.choices)
            assert streamed == c.text, (streamed, c.text)

        def disconnect():
            aborted0 = engine_stat(metrics_addr, "aborted_requests_total")
            stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=300,
                                                    stream=True, extra_body={"ignore_eos": True})
            it = iter(stream)
            got = [next(it), next(it)]
            assert all(ch.object == "chat.completion.chunk" for ch in got), got
            used = engine_stat(metrics_addr, "kv_blocks_used")
            assert used > 0, f"kv_blocks_used {used} while a request is running"
            stream.close()
            t = time.monotonic()
            while True:
                used, aborted = engine_stat(metrics_addr, "kv_blocks_used"), engine_stat(metrics_addr, "aborted_requests_total")
                if used == 0 and aborted >= aborted0 + 1:
                    break
                if time.monotonic() - t > 30:
                    raise AssertionError(f"30 s after the stream was closed: kv_blocks_used {used}, "
                                         f"aborted_requests_total {aborted} (was {aborted0})")
                time.sleep(0.1)
            total = engine_stat(metrics_addr, "kv_blocks_total")
            print(f"        disconnect: blocks back {time.monotonic() - t:.2f} s after close "
                  f"(kv_blocks_used 0 of {total:.0f}, aborted_requests_total {aborted0:.0f} -> {aborted:.0f})",
                  flush=True)
            ready = urllib.request.urlopen(f"http://{http_addr}/v2/health/ready", timeout=10).status
            assert ready == 200, ready

        def errors():
            try:
                client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
                raise AssertionError("max_tokens=0 was accepted")
            except openai.BadRequestError as e:
                assert e.status_code == 400 and isinstance(e.body, dict) and e.body.get("message"), e.body
                assert "max_tokens" in e.body["message"], e.body
                print(f"        max_tokens=0: {type(e).__name__}: {e.body['message']}", flush=True)
            try:
                client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
                raise AssertionError("an unknown model was accepted")
            except openai.NotFoundError as e:
                assert e.status_code == 404 and isinstance(e.body, dict) and e.body.get("message"), e.body
                print(f"        unknown model: {type(e).__name__}: {e.body['message']}", flush=True)

        check("models.list() names smollm2", models)
        check("chat completion answers Paris, usage consistent", chat)
        check("streamed chat completion: same text (Paris), same usage", chat_stream)
        check("completions.create, streamed = whole", completions)
        check("stream closed mid-answer: request aborted, KV blocks back (/metrics)", disconnect)
        check("bad requests raise BadRequestError / NotFoundError with a message", errors)
    except Exception:  # noqa: BLE001
        results.append(("start the server", traceback.format_exc()))
        print(f"FAILED  start the server\n{traceback.format_exc()}", flush=True)
    finally:
        if proc is not None:
            def graceful_exit():
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=60)
                assert code == 0, f"exit code {code}"

            check("graceful exit on SIGTERM", graceful_exit)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(repo, ignore_errors=True)
    failed = sum(1 for _, e in results if e)
    if failed:
        log.seek(0)
        tail = log.read()[-6000:]
        print(f"--- kiln serve stderr (last {len(tail)} chars) ---\n{tail}--- end ---")
    print(f"        total {time.monotonic() - t_all:.1f} s")
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
