"""Starts `kiln serve` on free localhost ports for the Python client tests."""
import subprocess


def start(kiln, repo):
    """`kiln serve` over `repo` with every port chosen by the OS; returns (proc, http, grpc, metrics)
    as HOST:PORT strings once the server has bound them."""
    proc = subprocess.Popen(
        [kiln, "serve", "--model-repository", repo, "--host", "127.0.0.1", "--http-port", "0",
         "--grpc-port", "0", "--metrics-port", "0", "--poll-interval-secs", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().split()
    # "kiln serve: http HOST:PORT grpc HOST:PORT metrics HOST:PORT"
    if len(line) < 8:
        proc.kill()
        raise RuntimeError(f"kiln serve did not start (said {line!r})")
    return proc, line[3], line[5], line[7]
