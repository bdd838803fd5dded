"""Scale-out of `kiln serve` on one machine: N replicas behind nginx (least-connections), driven by
Triton's official Python HTTP client at a fixed concurrency, and one replica killed under load.

    python deploy/bench/scaleout.py path/to/kiln [--replicas 1,2,4] [--concurrency 16]
        [--seconds 10] [--model mlp --batch 8 | --onnx FILE] [--threads N] [--failover-replicas 2]

`--model` serves a model of models/repository (`mlp` by default: request overhead dominates);
`--onnx FILE [--shape 1,3,224,224]` serves one float-input ONNX file (a temporary repository,
`max_batch_size = 0`; dynamic dims 1 unless `--shape`): compute dominates.

For each replica count: throughput (requests/s), latency p50/p99 and failed requests over a fixed
duration, every answer checked against onnxruntime on the same model file. Failover: with
`--failover-replicas` replicas under the same load, one replica gets SIGKILL a third of the way in;
reported are the requests that failed and the time from the kill to the last failure (how long
nginx took to route around the dead replica: `max_fails=1 fail_timeout=10s`, connection errors
retried on the next replica, a POST already sent is not retried, as nginx does by default).

Needs nginx (Debian package `nginx-light`) and the venv from `scripts/setup-python.sh serve`.
Prints a markdown table; exits non-zero when nginx or a replica cannot start, or an answer is wrong.
"""
import argparse
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_replica(kiln, repo, threads):
    env = dict(os.environ, RUST_LOG="warn")
    if threads:
        # Kiln's kernels (rayon, candle's pools) size themselves from these.
        env["RAYON_NUM_THREADS"] = env["CANDLE_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [kiln, "serve", "--model-repository", repo, "--host", "127.0.0.1", "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", "--poll-interval-secs", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    line = proc.stdout.readline().split()
    # "kiln serve: http HOST:PORT grpc HOST:PORT metrics HOST:PORT"
    if len(line) < 8:
        proc.kill()
        raise RuntimeError(f"kiln serve did not start (said {line!r})")
    return proc, line[3]


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 64m;
    client_body_buffer_size 16m;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream kiln {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://kiln;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
        }}
    }}
}}
"""


def start_nginx(addrs, port, workdir):
    servers = "\n".join(f"        server {a} max_fails=1 fail_timeout=10s;" for a in addrs)
    os.chmod(workdir, 0o755)  # nginx's workers (not root) write request bodies under it
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=workdir, servers=servers, port=port))
    subprocess.run(["nginx", "-c", conf, "-p", workdir], check=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            if c.is_server_ready():
                return conf
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("nginx did not come up")


def stop_nginx(conf, workdir):
    subprocess.run(["nginx", "-c", conf, "-p", workdir, "-s", "stop"], check=False)
    time.sleep(0.3)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Load:
    """`concurrency` client threads, each with its own Triton HTTP client, sending requests back
    to back for `seconds`; each answer is checked against the reference."""

    def __init__(self, url, model, io, x, want, concurrency):
        self.url, self.model, self.x, self.want, self.concurrency = url, model, x, want, concurrency
        self.input_name, self.output_name = io
        self.lock = threading.Lock()
        self.ok = []        # (end time, latency s)
        self.failed = []    # (end time, error)
        self.wrong = 0

    def worker(self, stop_at):
        client = httpclient.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
        inp = httpclient.InferInput(self.input_name, list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x, binary_data=True)
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                r = client.infer(self.model, [inp], outputs=[httpclient.InferRequestedOutput(self.output_name)])
                got = r.as_numpy(self.output_name)
                t1 = time.perf_counter()
                good = got is not None and np.allclose(got, self.want, rtol=1e-4, atol=1e-4)
                with self.lock:
                    self.ok.append((time.time(), t1 - t0))
                    self.wrong += 0 if good else 1
            except Exception as e:  # a failed request is data here, not a crash
                with self.lock:
                    self.failed.append((time.time(), f"{type(e).__name__}: {e}"[:300]))
                client.close()
                client = httpclient.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
        client.close()

    def run(self, seconds, during=None):
        start = time.time()
        stop_at = start + seconds
        threads = [threading.Thread(target=self.worker, args=(stop_at,)) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        if during:
            during(start)
        for t in threads:
            t.join()
        return time.time() - start


def pct(v, q):
    return float(np.percentile(v, q)) * 1000 if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("--repository", default=os.path.join(ROOT, "models", "repository"))
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--onnx", help="serve this ONNX file instead (batch 1)")
    ap.add_argument("--shape", help="input shape, e.g. 1,3,224,224 (default: the model's, dynamic dims 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads per replica (RAYON_NUM_THREADS; 0: one per core)")
    ap.add_argument("--failover-replicas", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("nginx") is None:
        sys.exit("nginx is needed (apt-get install nginx-light)")

    if args.onnx:
        args.repository = tempfile.mkdtemp(prefix="kiln-scaleout-repo-")
        args.model = os.path.splitext(os.path.basename(args.onnx))[0].replace(".", "_")
        os.makedirs(os.path.join(args.repository, args.model, "1"))
        os.symlink(os.path.abspath(args.onnx), os.path.join(args.repository, args.model, "1", "model.onnx"))
        with open(os.path.join(args.repository, args.model, "config.toml"), "w") as f:
            f.write("max_batch_size = 0\n")
    sess = ort.InferenceSession(os.path.join(args.repository, args.model, "1", "model.onnx"),
                                providers=["CPUExecutionProvider"])
    first_in, first_out = sess.get_inputs()[0], sess.get_outputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in first_in.shape]
    if args.shape:
        shape = [int(d) for d in args.shape.split(",")]
    elif not args.onnx:
        shape[0] = args.batch
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    want = sess.run([first_out.name], {first_in.name: x})[0]
    io = (first_in.name, first_out.name)

    rows, failover = [], None
    counts = [int(n) for n in args.replicas.split(",")]
    for n in counts + ([args.failover_replicas] if args.failover_replicas else []):
        is_failover = failover is None and len(rows) == len(counts)
        workdir = tempfile.mkdtemp(prefix="kiln-scaleout-")
        replicas = [start_replica(args.kiln, args.repository, args.threads) for _ in range(n)]
        port = free_port()
        conf = start_nginx([a for _, a in replicas], port, workdir)
        try:
            # Warm-up: every replica answers once directly.
            for _, a in replicas:
                httpclient.InferenceServerClient(a).is_model_ready(args.model)
            load = Load(f"127.0.0.1:{port}", args.model, io, x, want, args.concurrency)
            killed = {}

            def kill_one(start):
                time.sleep(args.seconds / 3)
                proc = replicas[0][0]
                killed["at"] = time.time()
                proc.send_signal(signal.SIGKILL)

            elapsed = load.run(args.seconds, during=kill_one if is_failover else None)
            lat = [l for _, l in load.ok]
            if load.wrong:
                raise RuntimeError(f"{load.wrong} answers differ from onnxruntime")
            row = dict(replicas=n, ok=len(load.ok), failed=len(load.failed), rps=len(load.ok) / elapsed,
                       p50=pct(lat, 50), p99=pct(lat, 99))
            if is_failover:
                after = [t for t, _ in load.failed if t >= killed["at"]]
                row["reroute_ms"] = (max(after) - killed["at"]) * 1000 if after else 0.0
                row["errors"] = sorted({e.split("\n")[0][:90] for _, e in load.failed})
                failover = row
            else:
                rows.append(row)
            if load.failed:
                row["first_error"] = load.failed[0][1]
            print(row, file=sys.stderr, flush=True)
        finally:
            stop_nginx(conf, workdir)
            for p, _ in replicas:
                p.kill()
                p.wait()
            shutil.rmtree(workdir, ignore_errors=True)

    threads = f"{args.threads} kernel threads" if args.threads else "one kernel thread per core"
    print(f"\nmodel {args.model}, input {shape}, {threads} per replica, {args.concurrency} concurrent clients "
          f"(tritonclient.http), {args.seconds:g} s per row, nginx least_conn, {os.cpu_count()} CPUs\n")
    print("| replicas | requests/s | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['failed']} |")
    if failover:
        total = failover["ok"] + failover["failed"]
        print(f"\nfailover: {failover['replicas']} replicas, one killed (SIGKILL) at {args.seconds / 3:.1f} s: "
              f"{failover['failed']} of {total} requests failed ({100 * failover['failed'] / max(total, 1):.2f}%), "
              f"last failure {failover['reroute_ms']:.0f} ms after the kill; {failover['rps']:.0f} requests/s "
              f"over the run; errors: {', '.join(failover['errors']) or 'none'}")


if __name__ == "__main__":
    main()
