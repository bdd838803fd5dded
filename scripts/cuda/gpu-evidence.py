#!/usr/bin/env python3
"""GPU evidence: correctness and speed of Kiln on CUDA against onnxruntime and PyTorch.

Runs on the GPU machine (PyTorch with CUDA, numpy, onnx, onnxruntime; no cargo, no network), with the
`kiln` binary unpacked from dist/kiln-gpu.tgz (scripts/cuda/build.sh):

    python3 scripts/cuda/gpu-evidence.py /tmp/kiln-gpu/kiln --out "$OUT"

1. Builds a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN 3072, GELU, post-LayerNorm,
   input [batch, 128, 768]) and a small CNN (Conv/BatchNorm/ReLU stages with residual blocks, global
   average pool, Linear; input [batch, 3, 224, 224]) with random weights (seed 0) and exports both to
   ONNX (opset 17, dynamic axis `batch`) into WORK/models (default /tmp/kiln-evidence; not under OUT,
   since only a few files of at most 16 MiB each in OUT are copied back from the GPU machine).
2. Correctness at batch 2 against onnxruntime CPU: Kiln on cuda at fp32 / fp16 / int8-weight (plus
   Kiln cuda fp32 at level basic and Kiln cpu fp32, to tell a CUDA problem from a fusion problem) and
   PyTorch's own fp32 and fp16 outputs.
3. Speed on the same GPU in one run: PyTorch eager fp32 / fp16, torch.compile fp16 (in a child process
   with a time limit), Kiln fp32 / fp16 through `kiln bench --device cuda`, at batch 1 / 8 / 64.
4. Writes OUT/gpu-evidence.md (ready to paste into docs/gpu.md), OUT/gpu-evidence.json and
   OUT/gpu-evidence-logs.txt (every command with its exit status and the end of its output; the full
   logs stay in WORK/logs).

Never hangs: every child process has a timeout (its whole process group is killed), in-process PyTorch
steps run under an alarm, and the whole run keeps to --budget seconds (later steps are skipped with a
reason). A failing step is recorded as `fails: <first error line>` and the run goes on.

`--self-test` checks, without torch or a GPU, the parts that do not need them (output parsing, the
comparison rules, the markdown writer, timeouts, and the Kiln correctness/speed path on a tiny ONNX
model with `--device cpu`) given a CPU `kiln` binary.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent.parent
GPU_RUN = REPO / "scripts" / "cuda" / "gpu-run.sh"

SEED = 0
SEQ = 128
HIDDEN = 768
HEADS = 12
FFN = 3072
LAYERS = 12
BATCHES = (1, 8, 64)
CHECK_BATCH = 2
OPSET = 17

MODELS = {
    "encoder": {
        "title": "BERT-base-shaped encoder (12 x [MHA 12 heads + GELU FFN 3072], hidden 768, seq 128)",
        "input": "x",
        "output": "hidden",
        "shape": lambda b: (b, SEQ, HIDDEN),
    },
    "cnn": {
        "title": "CNN (5 stride-2 Conv/BN/ReLU stages, 4 residual blocks, global pool, Linear 512->1000)",
        "input": "x",
        "output": "logits",
        "shape": lambda b: (b, 3, 224, 224),
    },
}


# ----------------------------------------------------------------------------------------------
# Clock, child processes, error lines


class Clock:
    """The whole run's budget; every step asks it how long it may take."""

    def __init__(self, budget_s: float, reserve_s: float = 10.0):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.reserve = reserve_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic() - self.reserve

    def limit(self, cap: float) -> float:
        """Seconds a step may take: at most `cap`, at most what is left of the budget."""
        return max(0.0, min(cap, self.left()))


class StepSkipped(Exception):
    pass


def first_error_line(text: str) -> str:
    """The line that best says why a command failed: the first line naming an error or panic,
    else the last non-empty line that is not gpu-run.sh's note, else ''."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if ln.startswith("gpu-run: CUDA libs from"):
            continue
        if "error" in low or "panicked" in low or "traceback" in low or "exception" in low:
            if low.startswith("traceback"):
                # A Python traceback: its last line is the exception.
                return lines[-1]
            return ln
    rest = [ln for ln in lines if not ln.startswith("gpu-run: CUDA libs from")]
    return rest[-1] if rest else ""


def fails(msg: str) -> str:
    msg = " ".join(str(msg).split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return "fails: " + (msg or "no message")


class Runner:
    """Runs child processes with timeouts, logs each one and remembers the commands."""

    def __init__(self, log_dir: Path, clock: Clock, summary: Path | None = None):
        self.log_dir = log_dir
        self.clock = clock
        self.summary = summary
        if summary is not None:
            summary.write_text("")
        self.commands: list[str] = []
        self.n = 0
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, argv: list[str], tag: str, cap_s: float, env: dict | None = None) -> dict:
        """Returns {ok, rc, out, err, timed_out, seconds, error}; never raises for the command's sake.
        `env`: variables added to this process's environment for the command."""
        self.n += 1
        log = self.log_dir / f"{self.n:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}.txt"
        limit = self.clock.limit(cap_s)
        cmd = " ".join(shlex.quote(a) for a in argv)
        self.commands.append(cmd)
        if limit < min(3.0, cap_s):
            return {"ok": False, "rc": None, "out": "", "err": "", "timed_out": False, "seconds": 0.0,
                    "error": "skipped: time budget spent"}
        out_path, err_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
        t0 = time.monotonic()
        timed_out = False
        rc = None
        spawn_error = None
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                p = subprocess.Popen(argv, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, **env} if env else None)
            except OSError as e:
                spawn_error = f"cannot start {argv[0]}: {e}"
            else:
                try:
                    rc = p.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
        seconds = time.monotonic() - t0
        out = out_path.read_text(errors="replace")
        err = err_path.read_text(errors="replace")
        head = f"$ {cmd}\n# rc {rc}, {seconds:.1f} s{', timed out' if timed_out else ''}\n"
        log.write_text(f"{head}--- stdout\n{out}\n--- stderr\n{err}\n")
        if self.summary is not None:
            with open(self.summary, "a") as f:
                f.write(f"{head}--- stdout (last 3000 characters)\n{out[-3000:]}\n"
                        f"--- stderr (last 3000 characters)\n{err[-3000:]}\n\n")
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)
        if spawn_error:
            error = spawn_error
        elif timed_out:
            error = f"timed out after {limit:.0f} s"
        elif rc != 0:
            error = first_error_line(err) or first_error_line(out) or f"exit status {rc}"
        else:
            error = None
        return {"ok": error is None, "rc": rc, "out": out, "err": err, "timed_out": timed_out,
                "seconds": seconds, "error": error}


class Alarm:
    """Raises TimeoutError in the main thread after `seconds` (for in-process PyTorch steps)."""

    def __init__(self, seconds: float, what: str):
        self.seconds = max(1, int(math.ceil(seconds)))
        self.what = what

    def _fire(self, signum, frame):
        raise TimeoutError(f"{self.what} exceeded {self.seconds} s")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)
        return False


# ----------------------------------------------------------------------------------------------
# Parsing and comparison (no torch)

_P50 = re.compile(r"latency ms:.*?\bp50\s+([0-9]+(?:\.[0-9]+)?)")
_MEAN = re.compile(r"latency ms:\s*mean\s+([0-9]+(?:\.[0-9]+)?)")
_THROUGHPUT = re.compile(r"throughput:\s*([0-9]+(?:\.[0-9]+)?)\s*runs/s")


def parse_bench(text: str) -> dict:
    """`kiln bench` output -> {p50_ms, mean_ms, runs_per_s}; raises ValueError without a p50."""
    m = _P50.search(text)
    if not m:
        raise ValueError("no 'latency ms: ... p50' line in kiln bench output")
    r = {"p50_ms": float(m.group(1))}
    if (m := _MEAN.search(text)):
        r["mean_ms"] = float(m.group(1))
    if (m := _THROUGHPUT.search(text)):
        r["runs_per_s"] = float(m.group(1))
    return r


def file_stem(name: str) -> str:
    """The file name `kiln run` gives an output (crates/kiln-cli/src/main.rs `file_stem`)."""
    s = "".join(c if (c.isascii() and c.isalnum()) or c in "_.-" else "_" for c in name)
    return f"output_{len(s)}" if s in ("", ".", "..") else s


RULES = {
    "fp32": "max|d| <= 1e-4 * max(1, max|ref|)",
    "fp16": "max|d| <= 1e-2 * max|ref|",
    "int8-weight": "cosine >= 0.99 and max|d| <= 0.1 * max|ref|",
}


def compare(got: np.ndarray, ref: np.ndarray, rule: str) -> dict:
    """Measured numbers and pass/fail of `got` against the reference under `rule` (a RULES key)."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    r = {"rule": RULES[rule]}
    if got.shape != ref.shape:
        r.update(ok=False, note=f"shape {list(got.shape)} != reference {list(ref.shape)}")
        return r
    g = got.astype(np.float64).ravel()
    f = ref.astype(np.float64).ravel()
    finite = bool(np.all(np.isfinite(g)))
    scale = float(np.max(np.abs(f))) if f.size else 0.0
    d = float(np.max(np.abs(g - f))) if f.size else 0.0
    ng, nf = float(np.linalg.norm(g)), float(np.linalg.norm(f))
    cos = float(np.dot(g, f) / (ng * nf)) if ng > 0 and nf > 0 else (1.0 if ng == nf else None)
    r.update(max_abs_diff=d, max_abs_ref=scale, rel=d / scale if scale > 0 else d, cosine=cos)
    if not finite:
        r.update(ok=False, note="non-finite values in the output")
    elif scale == 0:
        # An all-zero reference has no scale and no direction: the fp32 absolute bound for every rule.
        r.update(ok=d <= 1e-4, note="all-zero reference: max|d| <= 1e-4")
    elif rule == "fp32":
        r["ok"] = d <= 1e-4 * max(1.0, scale)
    elif rule == "fp16":
        r["ok"] = d <= 1e-2 * scale
    else:
        r["ok"] = cos >= 0.99 and d <= 0.1 * scale
    return r


# ----------------------------------------------------------------------------------------------
# Markdown


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _g(x, digits=3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) else "-"


def speed_cell(v) -> str:
    """A speed entry: {'ms', 'batch'} -> 'samples/s (ms)', a string (failure/skip) as is."""
    if isinstance(v, dict) and "ms" in v:
        thr = v["batch"] * 1000.0 / v["ms"] if v["ms"] > 0 else float("inf")
        return f"{thr:,.0f} ({v['ms']:.3f} ms)"
    return _cell(v if v is not None else "-")


def throughput(v):
    if isinstance(v, dict) and v.get("ms", 0) > 0:
        return v["batch"] * 1000.0 / v["ms"]
    return None


SPEED_COLUMNS = [
    ("torch_fp32", "PyTorch eager fp32"),
    ("torch_fp16", "PyTorch eager fp16"),
    ("torch_fp16_host", "PyTorch eager fp16, with host copies"),
    ("compile_fp16", "torch.compile fp16"),
    ("kiln_fp32", "Kiln fp32"),
    ("kiln_fp16", "Kiln fp16"),
    ("kiln_fp16_dev", "Kiln fp16, device I/O"),
]


def render_markdown(meta: dict, corr: list[dict], speed: dict) -> str:
    """The evidence page. `corr`: rows {model, run, precision, result: compare() | 'fails: ..'};
    `speed`: {(model, batch): {column key: {'ms', 'batch'} | str}}."""
    L = []
    L.append(f"## {meta.get('date', '?')}, {meta.get('card', '?')}: evidence run (`scripts/cuda/gpu-evidence.py`)")
    L.append("")
    L.append(f"Card: `{meta.get('card_csv', '?')}` (nvidia-smi name, memory, driver). "
             f"Software: {meta.get('software', '?')}. Kiln optimization level `{meta.get('level', '?')}`.")
    L.append("")
    L.append("Command (GPU machine):")
    L.append("")
    L.append("```")
    L.append(meta.get("command", "?"))
    L.append("```")
    L.append("")
    L.append("Models (random weights, seed 0, exported by the script): ")
    for name, m in MODELS.items():
        L.append(f"- `{name}`: {m['title']}; ONNX: {meta.get('export', {}).get(name, '?')}")
    L.append("")
    L.append(f"### Correctness (batch {CHECK_BATCH}, one fixed input, reference: onnxruntime "
             f"{meta.get('ort_version', '?')} CPU on the same ONNX file)")
    L.append("")
    L.append("`max|d|`: largest absolute difference from the reference over the whole output; "
             "`max|ref|`: largest absolute reference value; cosine over the flattened output. "
             "`int8-weight` is Kiln's weight-only mode: MatMul/Gemm weights in int8 with per-output-channel scales, "
             "everything else float (in the CNN that is only the final Linear; convolutions stay fp32). "
             "The PyTorch rows run the same module as the export (explicit MatMul/Softmax attention).")
    L.append("")
    L.append("| model | run | precision | max\\|d\\| | max\\|ref\\| | max\\|d\\| / max\\|ref\\| | cosine | rule | result |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for row in corr:
        r = row["result"]
        if isinstance(r, dict):
            res = ("pass" if r.get("ok") else "FAIL") + (f" ({r['note']})" if r.get("note") else "")
            L.append(f"| {row['model']} | {_cell(row['run'])} | {row['precision']} | {_g(r.get('max_abs_diff'))} | "
                     f"{_g(r.get('max_abs_ref'))} | {_g(r.get('rel'))} | {_g(r.get('cosine'), 6)} | "
                     f"{_cell(r['rule'])} | {res} |")
        else:
            L.append(f"| {row['model']} | {_cell(row['run'])} | {row['precision']} | - | - | - | - | "
                     f"{_cell(RULES.get(row['precision'], '-'))} | {_cell(r)} |")
    L.append("")
    if meta.get("placement"):
        L.append(f"### Where the nodes ran (`kiln inspect --device ... --dim <batch>={CHECK_BATCH}`: one trial run; "
                 "nodes without a device kernel for their op or dtype run on the CPU with explicit copies)")
        L.append("")
        for key, rep in meta["placement"].items():
            L.append(f"- {key}:")
            L.append("")
            L.append("  ```")
            L.extend("  " + ln for ln in str(rep).splitlines())
            L.append("  ```")
        L.append("")
    L.append("### Speed (same GPU, one run)")
    L.append("")
    L.append("Cells: samples/s (median latency of one batch). PyTorch: CUDA-event time of one forward under "
             "`torch.inference_mode()` with the input already on the GPU, median of >= 20 runs after warm-up "
             "(TF32 off, as Kiln's fp32); the `with host copies` column times `model(x.cuda().half()).float().cpu()` "
             "from a pageable f32 host tensor, which is what `kiln bench` measures (its `session.run` takes host "
             "tensors and returns host tensors). Kiln: p50 of `kiln bench --device cuda` (f32 inputs and outputs; "
             "fp16 converts weights once at load); `device I/O` is `kiln bench --io device` (inputs copied to the "
             "GPU once, outputs left there, each run synchronized: the same conditions as the PyTorch eager column). "
             "Ratios: Kiln fp16 / eager fp16 throughput, device I/O against eager, host I/O against eager with host "
             "copies. Encoder attention in PyTorch eager/compile is "
             "`F.scaled_dot_product_attention` (flash/memory-efficient kernels); the exported ONNX has the same "
             f"math as MatMul/Div/Softmax/MatMul. {meta.get('compile_note', '')}")
    L.append("")
    head = ("| model | batch | " + " | ".join(c for _, c in SPEED_COLUMNS)
            + " | Kiln fp16 / eager fp16 (device I/O) | Kiln fp16 / eager fp16 (host I/O) |")
    L.append(head)
    L.append("|" + "---|" * (len(SPEED_COLUMNS) + 4))

    def ratio(cols, kiln_key, torch_key):
        a, b = throughput(cols.get(kiln_key)), throughput(cols.get(torch_key))
        return f"{a / b:.2f}" if a and b else "-"

    for (model, batch) in sorted(speed, key=lambda k: (list(MODELS).index(k[0]) if k[0] in MODELS else 99, k[1])):
        cols = speed[(model, batch)]
        L.append(f"| {model} | {batch} | " + " | ".join(speed_cell(cols.get(k)) for k, _ in SPEED_COLUMNS)
                 + f" | {ratio(cols, 'kiln_fp16_dev', 'torch_fp16')} | {ratio(cols, 'kiln_fp16', 'torch_fp16_host')} |")
    L.append("")
    if meta.get("notes"):
        L.append("Notes:")
        L.append("")
        for n in meta["notes"]:
            L.append(f"- {_cell(n)}")
        L.append("")
    L.append("Every command the script ran (outputs in `gpu-evidence-logs.txt`):")
    L.append("")
    L.append("```")
    L.extend(meta.get("commands", []))
    L.append("```")
    L.append("")
    L.append(f"Script time: {meta.get('elapsed_s', 0):.0f} s.")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Kiln


def kiln_argv(args, device: str) -> list[str]:
    if device.startswith("cuda") and args.runner:
        return shlex.split(args.runner) + [args.kiln]
    return [args.kiln]


def kiln_correctness(args, runner: Runner, model: str, onnx_path: Path, inp: Path, input_name: str,
                     output_name: str, ref: np.ndarray, device: str, precision: str, level: str,
                     work: Path, outputs: dict | None = None) -> object:
    """One `kiln run`, compared with the reference: compare()'s dict, or 'fails: ..'. Keeps the output in
    `outputs[(device, precision, level)]`. An int8-weight output bit-identical to the fp32 output at the same
    device and level fails: no weight was quantized."""
    out_dir = work / f"kiln-{model}-{device.replace(':', '')}-{precision}-{level}"
    argv = kiln_argv(args, device) + ["run", str(onnx_path), "--device", device, "--precision", precision,
                                      "--level", level, "--input", f"{input_name}={inp}",
                                      "--output-dir", str(out_dir)]
    r = runner.run(argv, f"run-{model}-{device}-{precision}-{level}", args.kiln_timeout)
    if not r["ok"]:
        return r["error"] if r["error"].startswith("skipped") else fails(r["error"])
    path = out_dir / f"{file_stem(output_name)}.npy"
    try:
        got = np.load(path)
    except (OSError, ValueError) as e:
        return fails(f"reading {path}: {e}")
    r = compare(got, ref, precision)
    if outputs is not None:
        outputs[(device, precision, level)] = got
        f32 = outputs.get((device, "fp32", level))
        if precision == "int8-weight" and f32 is not None and f32.shape == got.shape and np.array_equal(f32, got):
            r.update(ok=False, note="bit-identical to Kiln fp32 at this level: no weight was quantized")
    return r


def kiln_speed(args, runner: Runner, model: str, onnx_path: Path, dim_name: str, batch: int, device: str,
               precision: str, level: str, env: dict | None = None, io: str = "host") -> object:
    """One `kiln bench`: {'ms': p50, 'batch'} or 'fails: ..' / 'skipped: ..'. `env`: extra variables;
    `io`: host (inputs in and outputs out every run) or device (IO binding)."""
    iters = 20 if batch >= 64 else 30
    argv = kiln_argv(args, device) + ["bench", str(onnx_path), "--device", device, "--precision", precision,
                                      "--level", level, "--dim", f"{dim_name}={batch}", "-n", str(iters),
                                      "--warmup", "3", "--io", io]
    tag = (f"bench-{model}-{device}-{precision}-b{batch}-io-{io}"
           + "".join(f"-{k}={v}" for k, v in (env or {}).items()))
    r = runner.run(argv, tag, args.kiln_timeout, env=env)
    if not r["ok"]:
        return r["error"] if r["error"].startswith("skipped") else fails(r["error"])
    try:
        b = parse_bench(r["out"])
    except ValueError as e:
        return fails(e)
    return {"ms": b["p50_ms"], "batch": batch, "kiln": b}


def real_model_rows(args, runner: Runner, models_dir: Path, work: Path) -> list[dict]:
    """Real models shipped by pip packages (models/fetch.sh) with onnxruntime references
    (models/make_reference.py: `<stem>.ref/<case>/{inputs,expected}/*.npy`): `kiln run` on the first
    complete case of each at fp32, fp16 and int8-weight, every output compared under the precision's
    rule; a row per model and precision with the worst output."""
    rows = []
    for ref in sorted(models_dir.glob("*.ref")):
        model = ref.with_suffix(".onnx")
        cases = [c for c in sorted(ref.iterdir()) if (c / ".complete").is_file()] if ref.is_dir() else []
        if not model.is_file() or not cases:
            continue
        case = cases[0]
        inputs = sorted((case / "inputs").glob("*.npy"))
        expected = sorted((case / "expected").glob("*.npy"))
        run_name = f"Kiln {args.device} (level {args.level}), case {case.name}, {len(expected)} output(s)"
        outs: dict = {}
        for prec in ("fp32", "fp16", "int8-weight"):
            out_dir = work / f"real-{model.stem}-{case.name}-{prec}"
            argv = kiln_argv(args, args.device) + ["run", str(model), "--device", args.device, "--precision", prec,
                                                   "--level", args.level, "--output-dir", str(out_dir)]
            for p in inputs:
                argv += ["--input", f"{p.stem}={p}"]
            r = runner.run(argv, f"real-{model.stem}-{prec}", args.kiln_timeout)
            if not r["ok"]:
                res = r["error"] if r["error"].startswith("skipped") else fails(r["error"])
            else:
                worst = None
                try:
                    got = {e.name: np.load(out_dir / e.name) for e in expected}
                except (OSError, ValueError) as e:
                    got, worst = None, fails(f"reading outputs: {e}")
                if got is not None:
                    outs[prec] = got
                    for e in expected:
                        c = compare(got[e.name], np.load(e), prec)
                        c["output"] = e.stem
                        if worst is None or (not c["ok"] and worst["ok"]) or (
                                c["ok"] == worst["ok"] and c.get("rel", 0) > worst.get("rel", 0)):
                            worst = c
                    if prec == "int8-weight" and "fp32" in outs and all(
                            np.array_equal(outs["fp32"][k], v) for k, v in got.items()):
                        worst["note"] = "identical to fp32: no MatMul/Gemm weight large enough to quantize"
                res = worst if worst is not None else fails("no expected outputs")
            rows.append({"model": model.stem, "run": run_name, "precision": prec, "result": res})
            print(f"real model {model.stem} {prec}: {res}", flush=True)
    return rows


def kiln_placement(args, runner: Runner, model: str, onnx_path: Path, dim_name: str, device: str,
                   precision: str, level: str) -> str:
    """`kiln inspect --device`: one trial run; the report of where nodes ran (from its 'trial run on'
    line: kernels, nodes that fell back to the CPU by op, device memory), or 'fails: ..'."""
    argv = kiln_argv(args, device) + ["inspect", str(onnx_path), "--device", device, "--precision", precision,
                                      "--level", level, "--dim", f"{dim_name}={CHECK_BATCH}"]
    r = runner.run(argv, f"inspect-{model}-{device}-{precision}", args.kiln_timeout)
    if not r["ok"]:
        return r["error"] if r["error"].startswith("skipped") else fails(r["error"])
    return placement_report(r["out"])


def placement_report(text: str) -> str:
    """The part of `kiln inspect --device` output from its 'trial run on' line on."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("trial run on"):
            return "\n".join(lines[i:]).strip()
    return fails("no 'trial run on' line in kiln inspect output")


def onnx_batch_dim(path: Path) -> str | None:
    """The dim_param of the first input's first axis (the symbol `kiln bench --dim` sets)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_param or None


def ort_reference(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {input_name: x})[0]


def fixed_input(model: str, batch: int) -> np.ndarray:
    rng = np.random.default_rng(SEED + 1)
    return rng.standard_normal(MODELS[model]["shape"](batch)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# PyTorch (imported only on the GPU machine)


def torch_modules():
    """(build_encoder, build_cnn): deterministic constructors (seed 0) of the two models."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.fc1, self.fc2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
            self.sdpa = False

        def forward(self, x):
            b, s = x.shape[0], x.shape[1]
            hd = HIDDEN // HEADS
            q = self.q(x).view(b, s, HEADS, hd).transpose(1, 2)
            k = self.k(x).view(b, s, HEADS, hd).transpose(1, 2)
            v = self.v(x).view(b, s, HEADS, hd).transpose(1, 2)
            if self.sdpa:
                ctx = F.scaled_dot_product_attention(q, k, v)
            else:
                scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
                ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            ctx = ctx.transpose(1, 2).reshape(b, s, HIDDEN)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

        def use_sdpa(self, on: bool):
            for layer in self.layers:
                layer.sdpa = on
            return self

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    def cbr(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(*cbr(c, c, 1), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(x + self.body(x))

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *cbr(3, 32, 2), *cbr(32, 64, 2), Block(64), *cbr(64, 128, 2), Block(128),
                *cbr(128, 256, 2), Block(256), *cbr(256, 512, 2), Block(512))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def build_encoder():
        torch.manual_seed(SEED)
        return Encoder().eval()

    def build_cnn():
        torch.manual_seed(SEED)
        m = Cnn()
        g = torch.Generator().manual_seed(SEED + 2)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    n = mod.num_features
                    mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                    mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
        return m.eval()

    return {"encoder": build_encoder, "cnn": build_cnn}


def torch_fp32_exact():
    """TF32 off for matmul and cuDNN conv (Kiln's fp32 is IEEE fp32). Returns what was set."""
    import torch

    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        return "fp32_precision = 'ieee' (matmul, cudnn conv)"
    except (AttributeError, RuntimeError, TypeError):
        pass
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "allow_tf32 = False (matmul, cudnn)"
    except (AttributeError, RuntimeError) as e:
        return f"could not turn TF32 off: {e}"


def export_onnx(model, x, path: Path, input_name: str, output_name: str) -> str:
    """Exports with the TorchScript exporter (dynamo=False) where it exists, else torch.export.
    Returns a description of what was used."""
    import torch

    kw = dict(input_names=[input_name], output_names=[output_name], opset_version=OPSET,
              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    errors = []
    with torch.no_grad():
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kw)
            return f"torch.onnx.export(dynamo=False, opset {OPSET})"
        except TypeError as e:
            if "dynamo" not in str(e):
                errors.append(f"dynamo=False: {e}")
            else:
                try:
                    torch.onnx.export(model, (x,), str(path), **kw)
                    return f"torch.onnx.export (TorchScript, opset {OPSET})"
                except Exception as e2:  # noqa: BLE001
                    errors.append(f"TorchScript: {e2}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"dynamo=False: {first_error_line(str(e)) or e}")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=[input_name],
                              output_names=[output_name], opset_version=OPSET,
                              dynamic_shapes={"x": {0: batch}}, external_data=False)
            return f"torch.onnx.export(dynamo=True, opset {OPSET}) after: {'; '.join(errors)}"
        except Exception as e:  # noqa: BLE001
            errors.append(f"dynamo=True: {first_error_line(str(e)) or e}")
    raise RuntimeError("; ".join(errors))


def time_cuda(fn, x, warmup: int = 5, min_iters: int = 20, max_iters: int = 200, target_s: float = 1.0) -> float:
    """Median CUDA-event milliseconds of fn(x) (inference mode), after warm-up."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        one = max(time.perf_counter() - t0, 1e-5)
        iters = int(min(max_iters, max(min_iters, target_s / one)))
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(x)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    return float(np.median(times))


def time_host(fn, warmup: int = 3, min_iters: int = 20, max_iters: int = 200, target_s: float = 1.0) -> float:
    """Median wall milliseconds of fn() (which must synchronize, e.g. by copying to the host)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-5)
        iters = int(min(max_iters, max(min_iters, target_s / one)))
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def compile_worker(args) -> int:
    """Child process: torch.compile fp16 of both models, one JSON line per (model, batch) as soon as it
    is measured (the parent keeps what was printed if it kills this process). With --device cpu (the
    rehearsal) it compiles fp32 on the CPU instead."""
    import torch

    torch_fp32_exact()
    builders = torch_modules()
    gpu = args.device.startswith("cuda")
    order = [(n, b) for n in MODELS for b in sorted(args.batches, reverse=True)]
    compiled = {}
    for name, batch in order:
        try:
            if name not in compiled:
                m = builders[name]().cuda().half() if gpu else builders[name]()
                if name == "encoder":
                    m.use_sdpa(True)
                compiled[name] = torch.compile(m, dynamic=False)
            cm = compiled[name]
            x = torch.from_numpy(fixed_input(name, batch))
            x = x.cuda().half() if gpu else x
            t0 = time.perf_counter()
            with torch.inference_mode():
                cm(x)
            if gpu:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms = time_cuda(cm, x) if gpu else time_host(lambda: cm(x), warmup=1, min_iters=3, max_iters=20)
            print(json.dumps({"model": name, "batch": batch, "ms": ms, "compile_s": compile_s}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"model": name, "batch": batch, "error": first_error_line(str(e)) or repr(e)}),
                  flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# The GPU run


def card_info(runner: Runner) -> tuple[str, str]:
    r = runner.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                   "nvidia-smi", 30)
    if not r["ok"]:
        return "unknown GPU", fails(r["error"])
    line = r["out"].strip().splitlines()[0] if r["out"].strip() else ""
    return (line.split(",")[0].strip() or "unknown GPU"), line


def evidence(args) -> int:
    clock = Clock(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    models_dir = work / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "logs", clock, summary=out / "gpu-evidence-logs.txt")
    md_path, json_path = out / "gpu-evidence.md", out / "gpu-evidence.json"
    card, card_csv = card_info(runner)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": card,
        "card_csv": card_csv,
        "level": args.level,
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "export": {},
        "notes": [],
        "commands": runner.commands,
    }
    if os.environ.get("KILN_GPU_CHECK"):
        meta["command"] = (f"KILN_GPU_CHECK={os.environ['KILN_GPU_CHECK']} bash scripts/cuda/gpu-check.sh\n"
                           f"# which runs: {meta['command']}")
    r = runner.run(kiln_argv(args, args.device) + ["--version"], "kiln-version", 30)
    kiln_version = r["out"].strip() if r["ok"] else fails(r["error"])
    r = runner.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], "git", 10)
    commit = r["out"].strip() if r["ok"] and r["out"].strip() else "unknown commit"
    corr: list[dict] = []
    speed: dict = {}

    def save():
        meta["elapsed_s"] = clock.elapsed()
        md_path.write_text(render_markdown(meta, corr, speed))
        json_path.write_text(json.dumps({"meta": meta, "correctness": corr,
                                         "speed": [{"model": k[0], "batch": k[1], **v} for k, v in speed.items()]},
                                        indent=1, default=str))

    def note(msg: str):
        print(msg, flush=True)
        meta["notes"].append(msg)

    try:
        import onnxruntime as ort

        meta["ort_version"] = ort.__version__
    except Exception as e:  # noqa: BLE001
        meta["ort_version"] = f"missing ({e})"
    try:
        import torch

        meta["software"] = (f"{kiln_version} ({commit}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
                            f"onnxruntime {meta['ort_version']}, numpy {np.__version__}")
        tf32 = torch_fp32_exact()
        note(f"PyTorch fp32: {tf32}")
        builders = torch_modules()
        have_cuda = torch.cuda.is_available()
        if not have_cuda:
            note("torch.cuda.is_available() is False: PyTorch rows skipped")
    except Exception as e:  # noqa: BLE001
        torch = None
        builders = {}
        have_cuda = False
        meta["software"] = f"{kiln_version} ({commit}), torch unavailable ({first_error_line(str(e)) or e})"
        note(f"PyTorch unavailable: {e}")
    save()

    # 1. Build and export.
    onnx_paths, dim_names, torch_models = {}, {}, {}
    for name, spec in MODELS.items():
        path = models_dir / f"{name}.onnx"
        if torch is None:
            meta["export"][name] = fails("no torch")
            continue
        try:
            with Alarm(clock.limit(180), f"building/exporting {name}"):
                m = builders[name]()
                torch_models[name] = m
                meta["export"][name] = export_onnx(m, torch.from_numpy(fixed_input(name, CHECK_BATCH)), path,
                                                   spec["input"], spec["output"])
            onnx_paths[name] = path
            dim_names[name] = onnx_batch_dim(path) or "batch"
            meta["export"][name] += f", `{path.name}` {path.stat().st_size / 2**20:.0f} MiB, batch symbol " \
                                    f"`{dim_names[name]}`"
        except Exception as e:  # noqa: BLE001
            meta["export"][name] = fails(first_error_line(str(e)) or repr(e))
        print(f"export {name}: {meta['export'][name]}", flush=True)
        save()

    # 2. Correctness.
    for name, spec in MODELS.items():
        if name not in onnx_paths:
            corr.append({"model": name, "run": "all", "precision": "-", "result": meta["export"][name]})
            continue
        x = fixed_input(name, CHECK_BATCH)
        inp = work / f"{name}-input.npy"
        np.save(inp, x)
        try:
            with Alarm(clock.limit(120), f"onnxruntime on {name}"):
                ref = ort_reference(onnx_paths[name], spec["input"], x)
        except Exception as e:  # noqa: BLE001
            corr.append({"model": name, "run": "onnxruntime CPU reference", "precision": "fp32",
                         "result": fails(first_error_line(str(e)) or e)})
            save()
            continue
        if name in torch_models:
            tdev = "cuda" if have_cuda else "cpu"
            for prec in ("fp32", "fp16") if have_cuda else ("fp32",):
                try:
                    with Alarm(clock.limit(60), f"PyTorch {prec} {name}"):
                        m = torch_models[name].to(tdev)
                        xt = torch.from_numpy(x).to(tdev)
                        if prec == "fp16":
                            m, xt = copy.deepcopy(m).half(), xt.half()
                        with torch.inference_mode():
                            got = m(xt).float().cpu().numpy()
                        del m
                    res = compare(got, ref, prec)
                except Exception as e:  # noqa: BLE001
                    res = fails(first_error_line(str(e)) or e)
                corr.append({"model": name, "run": f"PyTorch eager {tdev} (sanity)", "precision": prec,
                             "result": res})
                save()
        dev = args.device
        # int8-weight also at level extended: at level all, MatMul + Add may fuse before quantization.
        runs = [(dev, "fp32", args.level), (dev, "fp16", args.level), (dev, "int8-weight", args.level),
                (dev, "int8-weight", "extended"), (dev, "fp32", "basic"), ("cpu", "fp32", args.level)]
        kiln_outputs: dict = {}
        seen = set()
        for dev, prec, level in runs:
            if (dev, prec, level) in seen:
                continue
            seen.add((dev, prec, level))
            res = kiln_correctness(args, runner, name, onnx_paths[name], inp, spec["input"], spec["output"], ref,
                                   dev, prec, level, work, kiln_outputs)
            corr.append({"model": name, "run": f"Kiln {dev} (level {level})", "precision": prec, "result": res})
            print(f"correctness {name} kiln {dev} {prec} {level}: {res}", flush=True)
            save()
        # Where each node ran (nodes without a CUDA kernel fall back to the CPU, listed by kiln inspect).
        for prec in ("fp32", "fp16"):
            rep = kiln_placement(args, runner, name, onnx_paths[name], dim_names[name], args.device, prec,
                                 args.level)
            meta.setdefault("placement", {})[f"{name}, {args.device}, {prec}, level {args.level}"] = rep
            print(f"placement {name} {prec}:\n{rep}", flush=True)
            save()

    # 2b. Real models with onnxruntime references, when carried (dist/real-models.tgz).
    if args.real_models and Path(args.real_models).is_dir():
        corr.extend(real_model_rows(args, runner, Path(args.real_models), work))
        save()

    # 3. Speed: PyTorch eager in this process, then Kiln, then torch.compile in a child process.
    for name in MODELS:
        for b in args.batches:
            speed[(name, b)] = {}
    if have_cuda:
        for name in MODELS:
            if name not in torch_models:
                continue
            for b in args.batches:
                cols = speed[(name, b)]
                x32 = torch.from_numpy(fixed_input(name, b))
                for key, half in (("torch_fp32", False), ("torch_fp16", True)):
                    try:
                        with Alarm(clock.limit(60), f"PyTorch eager {key} {name} b{b}"):
                            m = torch_models[name].cuda()
                            if half:
                                m = copy.deepcopy(m).half()
                            if name == "encoder":
                                m.use_sdpa(True)
                            xt = x32.cuda().half() if half else x32.cuda()
                            cols[key] = {"ms": time_cuda(m, xt), "batch": b}
                            if half:
                                cols["torch_fp16_host"] = {
                                    "ms": time_host(lambda: m(x32.cuda().half()).float().cpu()), "batch": b}
                    except Exception as e:  # noqa: BLE001
                        cols[key] = fails(first_error_line(str(e)) or e)
                    finally:
                        if name == "encoder":
                            torch_models[name].use_sdpa(False)
                        m = xt = None
                print(f"speed {name} b{b} torch: { {k: speed_cell(v) for k, v in cols.items()} }", flush=True)
                save()
        for name in list(torch_models):
            torch_models[name] = torch_models[name].cpu()
        torch.cuda.empty_cache()
    else:
        for k in speed:
            speed[k]["torch_fp32"] = speed[k]["torch_fp16"] = "skipped: no PyTorch CUDA"
    # Kiln: most important first (the acceptance row is the encoder at batch 64 in fp16).
    kiln_order = [(n, b, p, io) for n in MODELS for b in sorted(args.batches, reverse=True)
                  for p, io in (("fp16", "device"), ("fp16", "host"), ("fp32", "host"))]
    for name, b, prec, io in kiln_order:
        key = f"kiln_{prec}" + ("_dev" if io == "device" else "")
        if name not in onnx_paths:
            speed[(name, b)][key] = meta["export"][name]
            continue
        res = kiln_speed(args, runner, name, onnx_paths[name], dim_names[name], b, args.device, prec, args.level,
                         io=io)
        speed[(name, b)][key] = res
        print(f"speed {name} b{b} kiln {prec} io {io}: {speed_cell(res)}", flush=True)
        save()
    # A/B of the acceptance cell (Kiln fp16, encoder, largest batch, device I/O) against two switches:
    # KILN_HOST_SHAPES=off (shape arithmetic on the GPU: every Reshape shape / Unsqueeze axes read waits for
    # it) and KILN_CUDA_ATTENTION=flash (the flash-style kernel instead of cuBLAS + fused softmax).
    if "encoder" in onnx_paths:
        b = max(args.batches)
        base = speed.get(("encoder", b), {}).get("kiln_fp16_dev")
        for env, what in (({"KILN_CUDA_ATTENTION": "flash"}, "attention through the flash-style kernel"),
                          ({"KILN_HOST_SHAPES": "off"}, "shape arithmetic on the GPU")):
            other = kiln_speed(args, runner, "encoder", onnx_paths["encoder"], dim_names["encoder"], b, args.device,
                               "fp16", args.level, env=env, io="device")
            note(f"A/B: Kiln fp16, encoder, batch {b}, device I/O: {speed_cell(base)} as shipped; "
                 f"{speed_cell(other)} with {' '.join(f'{k}={v}' for k, v in env.items())} ({what})")
            save()
    # torch.compile.
    if torch is None or (not have_cuda and args.device != "cpu") or args.compile_budget <= 0:
        meta["compile_note"] = "torch.compile: not run (no PyTorch CUDA or --compile-budget 0)."
    else:
        r = runner.run([sys.executable, str(SCRIPT), "--compile-worker", args.kiln, "--device", args.device,
                        "--batches", ",".join(map(str, args.batches))], "torch-compile", args.compile_budget)
        got = {}
        for line in r["out"].splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                got[(d.get("model"), d.get("batch"))] = d
        compile_s = [d["compile_s"] for d in got.values() if "compile_s" in d]
        for key in speed:
            d = got.get(key)
            if d and "ms" in d:
                speed[key]["compile_fp16"] = {"ms": d["ms"], "batch": key[1], "compile_s": d["compile_s"]}
            elif d and "error" in d:
                speed[key]["compile_fp16"] = fails(d["error"])
            elif r["timed_out"]:
                speed[key]["compile_fp16"] = f"skipped: torch.compile over its {args.compile_budget:.0f} s limit"
            elif not r["ok"]:
                speed[key]["compile_fp16"] = r["error"] if r["error"].startswith("skipped") else fails(r["error"])
            else:
                speed[key]["compile_fp16"] = "fails: no result"
        meta["compile_note"] = (
            f"torch.compile: default mode, `dynamic=False`, fp16, in a child process limited to "
            f"{args.compile_budget:.0f} s for everything (largest batch first, encoder before cnn); "
            f"first-call (compile) times: {', '.join(f'{s:.0f} s' for s in compile_s) or 'none'}.")
        print(meta["compile_note"], flush=True)
    save()
    print(f"wrote {md_path} ({clock.elapsed():.0f} s)", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Self-test (no torch, no GPU)


def self_test(args) -> int:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    # Parsing.
    sample = ("model:      m.onnx\ndevice:     cuda:0  level: All  precision: F16  threads: 16\n"
              "runs:       20 (after 3 warm-up)\n"
              "latency ms: mean 5.120  p50 4.987  p90 5.600  p99 6.100  min 4.900  max 6.200\n"
              "throughput: 195.31 runs/s\n")
    b = parse_bench(sample)
    check(b == {"p50_ms": 4.987, "mean_ms": 5.12, "runs_per_s": 195.31}, f"parse_bench sample -> {b}")
    try:
        parse_bench("error: something")
        check(False, "parse_bench rejects output without p50")
    except ValueError:
        check(True, "parse_bench rejects output without p50")
    check(file_stem("gpu_0/softmax_1") == "gpu_0_softmax_1" and file_stem("..") == "output_2", "file_stem")
    check(first_error_line("gpu-run: CUDA libs from /x\nerror: loading m.onnx: bad") == "error: loading m.onnx: bad",
          "first_error_line skips gpu-run's note")
    check(first_error_line("Traceback (most recent call last):\n  File x\nValueError: boom") == "ValueError: boom",
          "first_error_line takes a traceback's last line")
    check(first_error_line("thread 'main' panicked at src/x.rs:1:2:\nindex out of bounds").startswith("thread 'main' "
                                                                                                        "panicked"),
          "first_error_line finds a panic")

    # Comparison rules.
    ref = np.linspace(-2, 2, 1000, dtype=np.float32).reshape(10, 100)
    check(compare(ref + 1e-4, ref, "fp32")["ok"], "fp32 passes at 1e-4 * max(1, 2)")
    check(not compare(ref + 3e-4, ref, "fp32")["ok"], "fp32 fails at 3e-4 with max|ref| 2")
    check(compare(ref * 1.009, ref, "fp16")["ok"], "fp16 passes at 0.9% relative")
    check(not compare(ref + 0.03, ref, "fp16")["ok"], "fp16 fails at 0.03 with max|ref| 2")
    c = compare(ref * 1.05, ref, "int8-weight")
    check(c["ok"] and abs(c["cosine"] - 1) < 1e-9, f"int8 passes at 5% scale error, cosine {c['cosine']}")
    rng = np.random.default_rng(0)
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3
    c = compare(noisy, ref, "int8-weight")
    check(not c["ok"], f"int8 fails with noise 0.3 (cosine {c['cosine']:.4f}, max|d| {c['max_abs_diff']:.3f})")
    check(not compare(ref[:5], ref, "fp32")["ok"], "shape mismatch fails")
    zero = np.zeros_like(ref)
    z = compare(zero + 1e-8, zero, "int8-weight")
    check(z["ok"] and z["cosine"] is None and "all-zero" in z["note"], f"all-zero reference: absolute bound ({z})")
    check(not compare(zero + 1e-3, zero, "fp16")["ok"], "all-zero reference: 1e-3 fails")
    bad = ref.copy()
    bad[0, 0] = np.nan
    check(not compare(bad, ref, "fp16")["ok"], "NaN fails")

    # Child processes: timeout, missing binary.
    with tempfile.TemporaryDirectory() as td:
        clock = Clock(60, reserve_s=0)
        runner = Runner(Path(td) / "logs", clock)
        t0 = time.monotonic()
        r = runner.run(["bash", "-c", "sleep 30 & sleep 30"], "sleep", 2)
        check(r["timed_out"] and not r["ok"] and time.monotonic() - t0 < 10,
              f"timeout kills the process group ({r['error']}, {time.monotonic() - t0:.1f} s)")
        r = runner.run(["bash", "-c", 'echo "$KILN_X:${PATH:+path}"'], "env", 5, env={"KILN_X": "y"})
        check(r["ok"] and r["out"].strip() == "y:path", f"env adds to the environment ({r['out'].strip()!r})")
        r = runner.run(["/nonexistent/kiln"], "missing", 5)
        check(not r["ok"] and "cannot start" in r["error"], f"missing binary -> {r['error']}")
        r = runner.run(["bash", "-c", "echo 'gpu-run: CUDA libs from /x' >&2; echo 'error: no device' >&2; exit 1"],
                       "fail", 5)
        check(fails(r["error"]) == "fails: error: no device", f"failure line -> {fails(r['error'])}")
        spent = Runner(Path(td) / "logs2", Clock(0, reserve_s=0))
        r = spent.run(["true"], "spent", 5)
        check(r["error"] == "skipped: time budget spent", "spent budget skips")

        # Kiln on a tiny model, through the same functions the GPU run uses, on --device cpu.
        if args.kiln:
            w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
            bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["u"]),
                 helper.make_node("Relu", ["u"], ["out/y"])],
                "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                [helper.make_tensor_value_info("out/y", TensorProto.FLOAT, ["batch", 3])], [w, bias])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
            path = Path(td) / "tiny.onnx"
            onnx.save(model, str(path))
            check(onnx_batch_dim(path) == "batch", "onnx_batch_dim reads the symbol")
            x = rng.standard_normal((CHECK_BATCH, 4)).astype(np.float32)
            inp = Path(td) / "x.npy"
            np.save(inp, x)
            ref = ort_reference(path, "x", x)
            runner = Runner(Path(td) / "kiln-logs", Clock(120, reserve_s=0))
            args.runner = ""
            res, outs = {}, {}
            for prec in ("fp32", "fp16", "int8-weight"):
                res[prec] = kiln_correctness(args, runner, "tiny", path, inp, "x", "out/y", ref, "cpu", prec,
                                             args.level, Path(td), outs)
                ok = isinstance(res[prec], dict) and "max_abs_diff" in res[prec]
                check(ok, f"kiln run cpu {prec} vs ORT: {res[prec]}")
            check(isinstance(res["fp32"], dict) and res["fp32"]["ok"], "kiln cpu fp32 passes the fp32 rule")
            i8 = res["int8-weight"]
            check(isinstance(i8, dict) and not i8["ok"] and "no weight was quantized" in i8.get("note", ""),
                  "int8 identical to fp32 (the tiny weights stay f32) is flagged")
            # A real-models folder: the tiny model with an onnxruntime reference case.
            rm = Path(td) / "real"
            (rm / "tiny.ref" / "c1" / "inputs").mkdir(parents=True)
            (rm / "tiny.ref" / "c1" / "expected").mkdir(parents=True)
            (rm / "tiny.ref" / "c1" / ".complete").touch()
            onnx.save(model, str(rm / "tiny.onnx"))
            np.save(rm / "tiny.ref" / "c1" / "inputs" / "x.npy", x)
            np.save(rm / "tiny.ref" / "c1" / "expected" / f"{file_stem('out/y')}.npy", ref)
            dev_saved, args.device = args.device, "cpu"
            real = real_model_rows(args, runner, rm, Path(td))
            args.device = dev_saved
            check([r["precision"] for r in real] == ["fp32", "fp16", "int8-weight"], f"real-model rows {real}")
            check(isinstance(real[0]["result"], dict) and real[0]["result"]["ok"], "real model fp32 passes")
            check(isinstance(real[2]["result"], dict) and "identical to fp32" in real[2]["result"].get("note", ""),
                  "real model int8 identical to fp32 is noted")
            pl = kiln_placement(args, runner, "tiny", path, "batch", "cpu", "fp32", args.level)
            check(pl.startswith("trial run on cpu") and "every node runs on the CPU" in pl,
                  f"kiln inspect --device cpu -> {pl!r}")
            check(placement_report("model: x\nerror: y").startswith("fails:"), "placement_report without a trial line")
            sp = kiln_speed(args, runner, "tiny", path, "batch", 8, "cpu", "fp32", args.level)
            check(isinstance(sp, dict) and sp["ms"] > 0 and sp["batch"] == 8, f"kiln bench cpu -> {sp}")
            sp_bad = kiln_speed(args, runner, "tiny", path, "batch", 8, "cpu", "fp99", args.level)
            check(isinstance(sp_bad, str) and sp_bad.startswith("fails: error"), f"bad precision -> {sp_bad}")
            corr = [{"model": "encoder", "run": f"Kiln cpu (level {args.level})", "precision": p, "result": r}
                    for p, r in res.items()]
            corr.append({"model": "cnn", "run": "Kiln cuda", "precision": "fp16", "result": "fails: error: x | y"})
            sp_dev = kiln_speed(args, runner, "tiny", path, "batch", 8, "cpu", "fp32", args.level, io="device")
            check(isinstance(sp_dev, dict) and sp_dev["ms"] > 0, f"kiln bench cpu --io device -> {sp_dev}")
            speed = {("encoder", 8): {"kiln_fp32": sp, "kiln_fp16_dev": {"ms": sp["ms"] / 2, "batch": 8} if
                                      isinstance(sp, dict) else sp, "torch_fp16": {"ms": 1.0, "batch": 8},
                                      "kiln_fp16": {"ms": 4.0, "batch": 8}, "torch_fp16_host": {"ms": 2.0, "batch": 8},
                                      "compile_fp16": "skipped: torch.compile over its 120 s limit"},
                     ("encoder", 1): {"kiln_fp16": sp_bad}}
            md = render_markdown({"date": "today", "card": "test card", "commands": runner.commands,
                                  "level": args.level, "notes": ["a note"],
                                  "placement": {"tiny, cpu, fp32": pl}}, corr, speed)
            check("### Where the nodes ran" in md and "  trial run on cpu" in md, "placement section rendered")
            (Path(td) / "md.md").write_text(md)
            lines = md.splitlines()
            rows = [ln for ln in lines if ln.startswith("| encoder") or ln.startswith("| cnn")]
            check(len(rows) == 6, f"markdown has 4 correctness + 2 speed rows ({len(rows)})")
            check(all(ln.count("|") - ln.count("\\|") == lines[lines.index(rows[0]) - 2].count("|") - 
                      lines[lines.index(rows[0]) - 2].count("\\|") for ln in rows[:4]),
                  "correctness rows have the header's column count")
            check("fails: error: x \\| y" in md, "a '|' in a failure is escaped")
            exp = 8 * 1000 / (sp["ms"] / 2) / 8000 if isinstance(sp, dict) else None
            check(exp is not None and f"| {exp:.2f} | 0.50 |" in md,
                  "ratio columns: Kiln fp16 / eager fp16 throughput, device I/O then host I/O")
            check("kiln bench" in md and " bench " in "\n".join(runner.commands), "commands listed")
            print(md)
            summary = Path(td) / "kiln-logs" / "summary.txt"
            r2 = Runner(Path(td) / "kiln-logs2", Clock(30, reserve_s=0), summary=summary)
            r2.run(["bash", "-c", "echo hello; echo oops >&2"], "echo", 5)
            text = summary.read_text()
            check(text.startswith("$ bash -c") and "hello" in text and "oops" in text, "summary log")

            # The whole GPU flow without torch or a GPU: every step must end as a recorded failure.
            try:
                import torch  # noqa: F401

                print("skip  no-torch flow (torch is installed here)")
            except ImportError:
                flow = argparse.Namespace(**vars(args))
                flow.out, flow.work, flow.budget = str(Path(td) / "out"), str(Path(td) / "work"), 60
                t0 = time.monotonic()
                rc = evidence(flow)
                md = (Path(td) / "out" / "gpu-evidence.md").read_text()
                data = json.loads((Path(td) / "out" / "gpu-evidence.json").read_text())
                check(rc == 0 and time.monotonic() - t0 < 30, "no-torch flow ends")
                check(md.count("fails: no torch") >= 2 + 6 * 2, "no-torch flow records each missing step")
                check(len(data["speed"]) == 6 and len(data["correctness"]) == 2, "json has every row")
                check(sorted(os.listdir(Path(td) / "out")) ==
                      ["gpu-evidence-logs.txt", "gpu-evidence.json", "gpu-evidence.md"], "OUT holds 3 files")
        else:
            print("skip  kiln checks (no kiln binary given)")
    print(f"\nself-test: {len(failures)} failure(s)")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kiln", nargs="?", help="the kiln binary (CUDA build on the GPU machine; CPU build for --self-test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/kiln-gpu-out"), help="output folder (default $OUT)")
    ap.add_argument("--work", default="/tmp/kiln-evidence", help="models, inputs, outputs, full logs")
    ap.add_argument("--level", default="all", help="Kiln optimization level for the CUDA runs (default all)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    ap.add_argument("--kiln-timeout", type=float, default=120, help="seconds per kiln command (default 120)")
    ap.add_argument("--compile-budget", type=float, default=120,
                    help="seconds for all torch.compile work (default 120; 0 skips it)")
    ap.add_argument("--runner", default=f"bash {GPU_RUN}" if GPU_RUN.exists() else "",
                    help="command prefix that runs the CUDA kiln binary (default: scripts/cuda/gpu-run.sh)")
    ap.add_argument("--device", default="cuda", help="Kiln's device (cpu: a rehearsal on a machine without a GPU)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="speed batch sizes (default 1,8,64)")
    ap.add_argument("--real-models", default="",
                    help="a folder of real models with onnxruntime references (<stem>.onnx + <stem>.ref/)")
    ap.add_argument("--self-test", action="store_true", help="check the parts that need no torch or GPU")
    ap.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        args.batches = tuple(int(b) for b in str(args.batches).split(",") if b.strip())
    except ValueError:
        ap.error(f"--batches '{args.batches}': give sizes like 1,8,64")
    if args.self_test:
        return self_test(args)
    if args.compile_worker:
        return compile_worker(args)
    if not args.kiln:
        ap.error("give the kiln binary")
    args.kiln = str(Path(args.kiln).resolve())
    return evidence(args)


if __name__ == "__main__":
    sys.exit(main())
