"""`kiln serve` driven by the official Triton clients (tritonclient[http,grpc]) and plain HTTP for
TF-Serving REST, over real sockets. Outputs are checked against onnxruntime on the same model files
(float: allclose; int: exact) and against each other (HTTP JSON, HTTP binary and gRPC answers must be
bit-identical).

    python crates/kiln-serve/tests/python/tritonclient_test.py path/to/kiln

starts `path/to/kiln serve` on models/repository itself and also checks SIGTERM and SIGKILL on that
process. Against a server that is already running on models/repository (a container, say):

    python crates/kiln-serve/tests/python/tritonclient_test.py --http HOST:PORT --grpc HOST:PORT \
        [--metrics HOST:PORT] [--stop-command 'docker stop -t 10 NAME']

runs the same client tests; the ones that restart the process are skipped, the metrics test needs
--metrics, and with --stop-command the last test runs that command while clients keep sending (every
request the server accepted must be answered in full and correctly, or refused with 503).

Needs the venv from `scripts/setup-python.sh serve`. Prints 'N passed, M failed' (and 'K skipped' when
some were); exits non-zero on failure.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import traceback
import urllib.request

import kiln_server  # noqa: E402  (this folder)
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
REPO = os.path.join(ROOT, "models", "repository")


def ort_run(model, feeds):
    path = os.path.join(REPO, model, "1", "model.onnx")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def start(kiln):
    return kiln_server.start(kiln, REPO)


def post_infer(http_addr, x, timeout=30):
    """One request on a fresh connection: ('ok', logits) | ('status', code) | ('refused', None) |
    ('reset', None) (the connection was dropped before any response byte: the kernel's backlog of
    connections the server never accepted is reset when the listener closes)."""
    import http.client
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.flatten().tolist()}]})
    host, port = http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v2/models/mlp/infer", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()  # a truncated body raises IncompleteRead: a lost answer, not caught here
        if r.status != 200:
            return ("status", r.status)
        out = {o["name"]: o for o in json.loads(data)["outputs"]}
        return ("ok", np.array(out["logits"]["data"], dtype=np.float32).reshape(x.shape[0], 3))
    except ConnectionRefusedError:
        return ("refused", None)
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        return ("reset", None)
    finally:
        conn.close()


def stop_under_load(http_addr, want, stop_server, label):
    """Clients keep sending while `stop_server()` stops the server: every request the server
    accepted is answered in full and correctly (or refused with 503 while draining); the rest are
    refused at the socket. Returns what `stop_server()` returned."""
    import threading
    import time
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 5.0 - 1.0).astype(np.float32)
    outcomes, stop = [], threading.Event()
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            kind, v = post_infer(http_addr, x)
            with lock:
                outcomes.append((kind, v))
            if kind in ("refused", "reset"):
                return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = len(outcomes)
    stopped = stop_server()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    ok = [v for k, v in outcomes if k == "ok"]
    statuses = [v for k, v in outcomes if k == "status"]
    for v in ok:
        np.testing.assert_allclose(v, want["logits"], rtol=1e-5, atol=1e-6)
    assert before > 10 and len(ok) >= before, (before, len(ok))
    assert all(s == 503 for s in statuses), statuses
    kinds = {k: sum(1 for o in outcomes if o[0] == k) for k in ("ok", "status", "refused", "reset")}
    print(f"        {label}: {kinds}")
    return stopped


def sigterm_under_load(kiln, want):
    """Clients keep sending while the server gets SIGTERM: every request the server accepted is
    answered in full and correctly (or refused with 503 while draining); the rest are refused at
    the socket; the process exits 0."""
    proc, http_addr, _, _ = start(kiln)

    def terminate():
        proc.terminate()
        return proc.wait(timeout=60)

    code = stop_under_load(http_addr, want, terminate, "SIGTERM under load")
    assert code == 0, f"exit code {code}"


def stop_command_under_load(http_addr, want, command):
    """`command` (e.g. `docker stop -t 10 NAME`) stops the external server while clients keep
    sending; it must succeed, and every accepted request must be answered (see stop_under_load)."""
    import time

    def run():
        t0 = time.monotonic()
        r = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"{command!r} exited {r.returncode}: {r.stderr.strip()}"
        print(f"        {command!r} took {took:.1f}s")
        return took

    stop_under_load(http_addr, want, run, f"{command!r} under load")


def sigkill_then_restart(kiln, want):
    proc, http_addr, _, _ = start(kiln)
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 5.0 - 1.0).astype(np.float32)
    kind, v = post_infer(http_addr, x)
    assert kind == "ok", kind
    proc.kill()  # SIGKILL: no shutdown code runs
    proc.wait(timeout=30)
    proc, http_addr, _, _ = start(kiln)
    try:
        kind, v = post_infer(http_addr, x)
        assert kind == "ok", kind
        np.testing.assert_allclose(v, want["logits"], rtol=1e-5, atol=1e-6)
        ready = urllib.request.urlopen(f"http://{http_addr}/v2/health/ready").status
        assert ready == 200, ready
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kiln", nargs="?", help="the kiln binary to start (default mode)")
    p.add_argument("--http", metavar="HOST:PORT", help="test a running server's HTTP port instead")
    p.add_argument("--grpc", metavar="HOST:PORT", help="the running server's gRPC port (with --http)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="the running server's metrics port (with --http)")
    p.add_argument("--stop-command", metavar="CMD",
                   help="with --http: a command that stops the server gracefully, run last under load")
    a = p.parse_args()
    external = a.http or a.grpc or a.metrics or a.stop_command
    if a.kiln and external:
        p.error("give either the kiln binary or --http/--grpc, not both")
    if external and not (a.http and a.grpc):
        p.error("--http and --grpc go together")
    if not a.kiln and not external:
        p.error("give the kiln binary to start, or --http HOST:PORT --grpc HOST:PORT")
    return a


def main():
    args = parse_args()
    kiln = args.kiln
    if kiln:
        proc, http_addr, grpc_addr, metrics_addr = start(kiln)
    else:
        proc, http_addr, grpc_addr, metrics_addr = None, args.http, args.grpc, args.metrics
    results = []

    def check(name, fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok      {name}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            results.append((name, traceback.format_exc()))
            print(f"FAILED  {name}\n{traceback.format_exc()}")

    skipped = []

    def skip(name, why):
        skipped.append(name)
        print(f"skipped {name} ({why})")

    http = httpclient.InferenceServerClient(url=http_addr)
    grpc = grpcclient.InferenceServerClient(url=grpc_addr)
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 5.0 - 1.0).astype(np.float32)
    want = ort_run("mlp", {"input": x})
    answers = {}

    def health():
        assert http.is_server_live() and http.is_server_ready()
        assert http.is_model_ready("mlp") and http.is_model_ready("simple", "1")
        assert not http.is_model_ready("mlp", "7")
        assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("mlp")
        assert http.get_server_metadata()["name"] == "kiln"
        assert grpc.get_server_metadata().name == "kiln"

    def metadata():
        m = http.get_model_metadata("mlp")
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}], m
        assert [o["name"] for o in m["outputs"]] == ["logits", "probabilities"]
        g = grpc.get_model_metadata("simple")
        assert g.inputs[0].datatype == "INT32" and list(g.inputs[0].shape) == [1, 16]
        assert http.get_model_config("mlp")["max_batch_size"] == 16

    def infer_http(binary):
        def run():
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ["logits", "probabilities"]]
            r = http.infer("mlp", [inp], outputs=outs, request_id="py-1")
            assert r.get_response()["id"] == "py-1"
            for n in ["logits", "probabilities"]:
                got = r.as_numpy(n)
                assert got.dtype == np.float32 and got.shape == (3, 3)
                np.testing.assert_allclose(got, want[n], rtol=1e-5, atol=1e-6)
                answers[(n, "binary" if binary else "json")] = got
        return run

    def infer_grpc():
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = grpc.infer("mlp", [inp])
        for n in ["logits", "probabilities"]:
            got = r.as_numpy(n)
            np.testing.assert_allclose(got, want[n], rtol=1e-5, atol=1e-6)
            answers[(n, "grpc")] = got

    def same_bits():
        for n in ["logits", "probabilities"]:
            a, b, c = answers[(n, "json")], answers[(n, "binary")], answers[(n, "grpc")]
            assert a.tobytes() == b.tobytes() == c.tobytes(), n

    def infer_int32():
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, dtype=np.int32)
        expect = ort_run("simple", {"INPUT0": a, "INPUT1": b})
        for client, mod in [(http, httpclient), (grpc, grpcclient)]:
            i0, i1 = mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")
            i0.set_data_from_numpy(a)
            i1.set_data_from_numpy(b)
            r = client.infer("simple", [i0, i1])
            assert (r.as_numpy("OUTPUT0") == expect["OUTPUT0"]).all()
            assert (r.as_numpy("OUTPUT1") == expect["OUTPUT1"]).all()

    def errors():
        bad = httpclient.InferInput("input", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
        try:
            http.infer("mlp", [bad])
            raise AssertionError("a wrong shape was accepted")
        except httpclient.InferenceServerException as e:
            assert "does not match" in str(e), e
        gin = grpcclient.InferInput("input", [1, 4], "FP32")
        gin.set_data_from_numpy(x[:1])
        try:
            grpc.infer("nope", [gin])
            raise AssertionError("an unknown model was accepted")
        except grpcclient.InferenceServerException as e:
            assert "unknown model" in str(e), e

    def tf_rest():
        body = json.dumps({"instances": x.tolist()}).encode()
        req = urllib.request.Request(f"http://{http_addr}/v1/models/mlp:predict", data=body, method="POST")
        preds = json.load(urllib.request.urlopen(req))["predictions"]
        got = np.array([p["logits"] for p in preds], dtype=np.float32)
        np.testing.assert_allclose(got, want["logits"], rtol=1e-5, atol=1e-6)
        body = json.dumps({"inputs": {"input": x.tolist()}}).encode()
        req = urllib.request.Request(f"http://{http_addr}/v1/models/mlp:predict", data=body, method="POST")
        outs = json.load(urllib.request.urlopen(req))["outputs"]
        assert np.array(outs["probabilities"], dtype=np.float32).tobytes() == answers[("probabilities", "json")].tobytes()

    def metrics():
        text = urllib.request.urlopen(f"http://{metrics_addr}/metrics").read().decode()
        line = [l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="mlp",version="1"}')]
        assert line and float(line[0].split()[-1]) >= 5, line

    try:
        check("health", health)
        check("metadata", metadata)
        check("infer HTTP JSON", infer_http(False))
        check("infer HTTP binary", infer_http(True))
        check("infer gRPC", infer_grpc)
        check("HTTP JSON, HTTP binary and gRPC agree bit for bit", same_bits)
        check("infer INT32 (HTTP, gRPC)", infer_int32)
        check("errors", errors)
        check("TF-Serving REST predict (row, columnar)", tf_rest)
        if metrics_addr:
            check("metrics", metrics)
        else:
            skip("metrics", "no --metrics")
    finally:
        http.close()
        grpc.close()
        if proc is not None:
            proc.terminate()  # SIGTERM: graceful shutdown
            code = proc.wait(timeout=60)

            def graceful_exit():
                assert code == 0, f"exit code {code}"

            check("graceful exit on SIGTERM", graceful_exit)
    if kiln:
        check("SIGTERM under load: every accepted request answered, exit 0", lambda: sigterm_under_load(kiln, want))
        check("SIGKILL, then a restart on the same repository serves again", lambda: sigkill_then_restart(kiln, want))
    else:
        for name in ["graceful exit on SIGTERM", "SIGTERM under load: every accepted request answered, exit 0",
                     "SIGKILL, then a restart on the same repository serves again"]:
            skip(name, "the server is not this test's process")
        if args.stop_command:
            check(f"stop under load ({args.stop_command}): every accepted request answered",
                  lambda: stop_command_under_load(http_addr, want, args.stop_command))
    failed = sum(1 for _, e in results if e)
    print(f"{len(results) - failed} passed, {failed} failed" + (f", {len(skipped)} skipped" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
