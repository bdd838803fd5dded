#!/usr/bin/env python3
"""Run every ONNX node test in DATADIR through onnxruntime and record pass/fail.

Usage: ort_rates.py DATADIR OUTFILE [--jobs N] [--timeout SECONDS] [--filter SUBSTR]

DATADIR is the output of gen_node_tests.py. OUTFILE is a TSV, one line per
test, sorted by name:  test_name <TAB> status <TAB> detail
status is one of  pass | fail | error
  pass  - every output matched THE RULE below
  fail  - ORT ran, an output did not match (detail says which/why)
  error - ORT could not load/run the model, the test could not be read,
          the test timed out, or ORT crashed the worker process

THE RULE (kiln's Rust conformance runner must implement exactly this)
---------------------------------------------------------------------
For each test_data_set_N of a test:
 * The number of outputs produced must equal the number of output_K.pb files.
   Output K is compared against output_K.pb (graph output order).
 * The kind of each output (tensor / sequence / optional / map, see meta.json)
   decides how it is compared:
   - tensor:   compare as tensors (below).
   - sequence: lengths must be equal; elements compared pairwise with this
               same rule.
   - optional: expected empty <=> actual empty; if both hold a value, compare
               the contained values with this same rule.
   - map:      key sets equal; values compared with this same rule.
 * Tensor comparison:
   - element dtype must be equal (ONNX TensorProto data_type);
   - shape must be exactly equal (a scalar [] is NOT equal to [1]);
   - values, by dtype:
     . FLOAT16, FLOAT, DOUBLE, BFLOAT16: widen both to f64, then per element
         both NaN                   -> equal (NaN at the same position)
         exactly one NaN            -> mismatch
         either is +-inf            -> must be identical (same sign of inf)
         otherwise                  -> |actual - expected| <= atol + rtol*|expected|
       with  rtol = max(1e-3, meta.rtol)  and  atol = max(1e-5, meta.atol)
       (meta.json rtol/atol come from the onnx TestCase; in onnx 1.23.2 every
       node test carries rtol=1e-3, atol=1e-7, so effectively rtol=1e-3,
       atol=1e-5).
     . FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ, FLOAT8E8M0,
       FLOAT4E2M1: exact equality of the decoded values, with NaN == NaN
       (so +0 == -0; NaN bit patterns do not matter). No tolerance.
     . integers (INT2/4/8/16/32/64, UINT2/4/8/16/32/64), BOOL: exact equality.
     . STRING: exact byte equality (UTF-8).
     . COMPLEX64/128: exact equality (no node test uses them).
If a test has several data sets, all must pass.

Isolation: tests run in worker processes (default: one per CPU); each ORT
session uses CPUExecutionProvider with intra_op_num_threads=1 and
inter_op_num_threads=1. A test that runs longer than --timeout, or that kills
its worker (segfault/abort), is recorded as "error" and a fresh worker takes
over, so one bad test never stops the run.

At the end prints "ORT: passed X of N".
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import deque
from multiprocessing.connection import wait

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-5

# ONNX TensorProto.DataType values (kept literal so the parent process does not
# need to import onnx).
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL = 1, 2, 3, 4, 5, 6, 7, 8, 9
FLOAT16, DOUBLE, UINT32, UINT64, COMPLEX64, COMPLEX128, BFLOAT16 = 10, 11, 12, 13, 14, 15, 16
FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ = 17, 18, 19, 20
UINT4, INT4, FLOAT4E2M1, FLOAT8E8M0, UINT2, INT2 = 21, 22, 23, 24, 25, 26

TOLERANCE_FLOATS = {FLOAT16, FLOAT, DOUBLE, BFLOAT16}
EXACT_FLOATS = {FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ, FLOAT8E8M0, FLOAT4E2M1}
# Types numpy / the ORT python binding handle natively; the rest go through raw bytes.
NUMPY_NATIVE = {
    FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL,
    FLOAT16, DOUBLE, UINT32, UINT64, COMPLEX64, COMPLEX128,
}


class Mismatch(Exception):
    pass


# --------------------------------------------------------------------------
# Values. Tensors are carried as Tensor(dtype, shape, array) so that the ONNX
# element type survives even where numpy has no matching dtype.
# --------------------------------------------------------------------------
class Tensor:
    __slots__ = ("dtype", "shape", "array")

    def __init__(self, dtype: int, shape: tuple, array):
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        self.array = array


def tensor_from_proto(tp) -> Tensor:
    from onnx import numpy_helper

    return Tensor(tp.data_type, tuple(tp.dims), numpy_helper.to_array(tp))


def sequence_from_proto(sp) -> list:
    from onnx import SequenceProto

    et = sp.elem_type
    if et == SequenceProto.TENSOR:
        return [tensor_from_proto(t) for t in sp.tensor_values]
    if et == SequenceProto.SEQUENCE:
        return [sequence_from_proto(s) for s in sp.sequence_values]
    if et == SequenceProto.MAP:
        return [map_from_proto(m) for m in sp.map_values]
    if et == SequenceProto.OPTIONAL:
        return [optional_from_proto(o) for o in sp.optional_values]
    raise ValueError(f"unsupported SequenceProto elem_type {et}")


def map_from_proto(mp_) -> dict:
    from onnx import TensorProto

    keys = list(mp_.string_keys) if mp_.key_type == TensorProto.STRING else list(mp_.keys)
    values = sequence_from_proto(mp_.values)
    return dict(zip(keys, values))


def optional_from_proto(op):
    from onnx import OptionalProto

    et = op.elem_type
    if et == OptionalProto.UNDEFINED:
        return None
    if et == OptionalProto.TENSOR:
        return tensor_from_proto(op.tensor_value)
    if et == OptionalProto.SEQUENCE:
        return sequence_from_proto(op.sequence_value)
    if et == OptionalProto.MAP:
        return map_from_proto(op.map_value)
    if et == OptionalProto.OPTIONAL:
        return optional_from_proto(op.optional_value)
    raise ValueError(f"unsupported OptionalProto elem_type {et}")


def load_pb(path: str, kind: str):
    import onnx

    cls = {
        "tensor": onnx.TensorProto,
        "sequence": onnx.SequenceProto,
        "optional": onnx.OptionalProto,
        "map": onnx.MapProto,
    }[kind]
    proto = cls()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return {
        "tensor": tensor_from_proto,
        "sequence": sequence_from_proto,
        "optional": optional_from_proto,
        "map": map_from_proto,
    }[kind](proto)


# --------------------------------------------------------------------------
# THE RULE
# --------------------------------------------------------------------------
def dtype_name(dt: int) -> str:
    try:
        from onnx import TensorProto

        return TensorProto.DataType.Name(dt)
    except Exception:  # noqa: BLE001
        return str(dt)


def _fmt(x) -> str:
    return repr(x.item() if hasattr(x, "item") else x)


def compare_tensor(exp: Tensor, act: Tensor, rtol: float, atol: float) -> None:
    import numpy as np

    if act.dtype != exp.dtype:
        raise Mismatch(f"dtype {dtype_name(act.dtype)} != expected {dtype_name(exp.dtype)}")
    if act.shape != exp.shape:
        raise Mismatch(f"shape {list(act.shape)} != expected {list(exp.shape)}")
    dt = exp.dtype
    if dt in TOLERANCE_FLOATS or dt in EXACT_FLOATS:
        e = np.asarray(exp.array).astype(np.float64).reshape(-1)
        a = np.asarray(act.array).astype(np.float64).reshape(-1)
        with np.errstate(all="ignore"):
            en, an = np.isnan(e), np.isnan(a)
            if dt in TOLERANCE_FLOATS:
                inf = np.isinf(e) | np.isinf(a)
                close = np.abs(a - e) <= atol + rtol * np.abs(e)
                ok = np.where(en | an, en & an, np.where(inf, a == e, close))
            else:
                ok = np.where(en | an, en & an, a == e)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            i = int(bad[0])
            fin = ~(en | an) & ~(np.isinf(e) | np.isinf(a))
            with np.errstate(all="ignore"):
                maxdiff = float(np.max(np.abs(a - e)[fin], initial=0.0))
            raise Mismatch(
                f"{len(bad)}/{e.size} values differ; first at flat index {i}: "
                f"actual {float(a[i])!r} expected {float(e[i])!r}; max abs diff {maxdiff:.3g} "
                f"(rtol {rtol:g}, atol {atol:g})"
            )
        return
    if dt == STRING:
        def as_bytes(v):
            return v if isinstance(v, bytes) else str(v).encode("utf-8")

        e = [as_bytes(v) for v in np.asarray(exp.array, dtype=object).reshape(-1)]
        a = [as_bytes(v) for v in np.asarray(act.array, dtype=object).reshape(-1)]
        bad = [i for i, (x, y) in enumerate(zip(a, e)) if x != y]
        if bad:
            i = bad[0]
            raise Mismatch(
                f"{len(bad)}/{len(e)} strings differ; first at flat index {i}: "
                f"actual {a[i]!r} expected {e[i]!r}"
            )
        return
    # integers, bool, sub-byte ints, complex: exact
    e = np.asarray(exp.array).reshape(-1)
    a = np.asarray(act.array).reshape(-1)
    if dt in (INT2, INT4):
        e, a = e.astype(np.int8), a.astype(np.int8)
    elif dt in (UINT2, UINT4):
        e, a = e.astype(np.uint8), a.astype(np.uint8)
    ok = a == e
    if not np.all(ok):
        bad = np.flatnonzero(~ok)
        i = int(bad[0])
        raise Mismatch(
            f"{len(bad)}/{e.size} values differ; first at flat index {i}: "
            f"actual {_fmt(a[i])} expected {_fmt(e[i])}"
        )


def compare_value(exp, act, kind: str, rtol: float, atol: float) -> None:
    """kind is the meta.json kind at the top level; nested values infer it."""
    if kind == "tensor" or isinstance(exp, Tensor):
        if not isinstance(act, Tensor):
            raise Mismatch(f"expected a tensor, got {type(act).__name__}")
        compare_tensor(exp, act, rtol, atol)
    elif kind == "sequence" or isinstance(exp, list):
        if not isinstance(act, list):
            raise Mismatch(f"expected a sequence, got {type(act).__name__}")
        if len(act) != len(exp):
            raise Mismatch(f"sequence length {len(act)} != expected {len(exp)}")
        for i, (e, a) in enumerate(zip(exp, act)):
            try:
                compare_value(e, a, "", rtol, atol)
            except Mismatch as m:
                raise Mismatch(f"element {i}: {m}") from None
    elif kind == "optional":
        if (exp is None) != (act is None):
            raise Mismatch(
                "optional: expected " + ("empty" if exp is None else "a value")
                + ", got " + ("empty" if act is None else "a value")
            )
        if exp is not None:
            compare_value(exp, act, "", rtol, atol)
    elif kind == "map" or isinstance(exp, dict):
        if not isinstance(act, dict):
            raise Mismatch(f"expected a map, got {type(act).__name__}")
        if set(act) != set(exp):
            raise Mismatch("map keys differ")
        for k in exp:
            try:
                compare_value(exp[k], act[k], "", rtol, atol)
            except Mismatch as m:
                raise Mismatch(f"key {k!r}: {m}") from None
    elif exp is None:
        if act is not None:
            raise Mismatch("expected empty optional, got a value")
    else:
        raise Mismatch(f"cannot compare value of type {type(exp).__name__}")


# --------------------------------------------------------------------------
# ORT glue (worker side)
# --------------------------------------------------------------------------
def tensor_to_ort_feed(t: Tensor):
    """numpy array for native types, OrtValue (raw bytes) for the others."""
    import ctypes

    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper

    if t.dtype in NUMPY_NATIVE:
        return np.asarray(t.array)
    # bfloat16, float8*, float4, (u)int4, (u)int2: ORT takes the packed
    # little-endian bytes onnx itself would write in raw_data.
    raw = numpy_helper.from_array(np.asarray(t.array)).raw_data
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), t.dtype)
    n = ov.tensor_size_in_bytes()
    if n != len(raw):
        raise RuntimeError(f"raw size mismatch for dtype {t.dtype}: {n} vs {len(raw)}")
    if n:
        ctypes.memmove(ov.data_ptr(), raw, n)
    return ov


def to_ort_feed(v):
    if isinstance(v, Tensor):
        return tensor_to_ort_feed(v)
    if isinstance(v, list):
        return [to_ort_feed(x) for x in v]
    if isinstance(v, dict):
        return {k: to_ort_feed(x) for k, x in v.items()}
    return v  # None (empty optional)


def from_ort_numpy(v):
    """Convert an output of InferenceSession.run() to our value model."""
    import numpy as np
    from onnx import helper

    if v is None:
        return None
    if isinstance(v, list):
        return [from_ort_numpy(x) for x in v]
    if isinstance(v, dict):
        return {k: from_ort_numpy(x) for k, x in v.items()}
    arr = np.asarray(v)
    if arr.dtype == object or arr.dtype.kind in "US":
        return Tensor(STRING, arr.shape, arr)
    return Tensor(helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr)


def from_ort_value_raw(ov) -> Tensor:
    """Decode an OrtValue tensor of any element type via its raw bytes."""
    import ctypes

    import onnx
    from onnx import numpy_helper

    dtype = ov.element_type()
    shape = tuple(ov.shape())
    if dtype in NUMPY_NATIVE:
        arr = ov.numpy()
        return Tensor(dtype, shape, arr)
    n = ov.tensor_size_in_bytes()
    tp = onnx.TensorProto()
    tp.data_type = dtype
    tp.dims.extend(shape)
    tp.raw_data = ctypes.string_at(ov.data_ptr(), n) if n else b""
    return Tensor(dtype, shape, numpy_helper.to_array(tp))


_SESSION_OPTS = None


def run_test(test_dir: str) -> tuple[str, str]:
    """Returns (status, detail). Runs inside a worker process."""
    import onnx
    import onnxruntime as ort

    global _SESSION_OPTS
    try:
        with open(os.path.join(test_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        rtol = max(DEFAULT_RTOL, float(meta.get("rtol", 0.0)))
        atol = max(DEFAULT_ATOL, float(meta.get("atol", 0.0)))
        in_kinds = [x["kind"] for x in meta["inputs"]]
        out_kinds = [x["kind"] for x in meta["outputs"]]
        data_sets = sorted(
            glob.glob(os.path.join(test_dir, "test_data_set_*")),
            key=lambda p: int(p.rsplit("_", 1)[1]),
        )
        if not data_sets:
            return "error", "no test_data_set_* directory"
        model = onnx.load(os.path.join(test_dir, "model.onnx"))
        # Output element types that numpy/ORT-python cannot represent -> raw path.
        raw_path = False
        for vi in model.graph.output:
            if vi.type.WhichOneof("value") != "tensor_type":
                continue
            if vi.type.tensor_type.elem_type not in NUMPY_NATIVE:
                raw_path = True
        del model
    except Exception as e:  # noqa: BLE001
        return "error", f"reading test: {type(e).__name__}: {e}"

    try:
        if _SESSION_OPTS is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.log_severity_level = 4
            _SESSION_OPTS = so
        sess = ort.InferenceSession(
            os.path.join(test_dir, "model.onnx"),
            sess_options=_SESSION_OPTS,
            providers=["CPUExecutionProvider"],
        )
        input_names = [i.name for i in sess.get_inputs()]
    except Exception as e:  # noqa: BLE001
        return "error", f"ORT load: {type(e).__name__}: {e}"

    for ds in data_sets:
        ds_name = os.path.basename(ds)
        try:
            inputs = []
            k = 0
            while os.path.exists(os.path.join(ds, f"input_{k}.pb")):
                inputs.append(load_pb(os.path.join(ds, f"input_{k}.pb"), in_kinds[k]))
                k += 1
            expected = []
            k = 0
            while os.path.exists(os.path.join(ds, f"output_{k}.pb")):
                kind = out_kinds[k] if k < len(out_kinds) else "tensor"
                expected.append(load_pb(os.path.join(ds, f"output_{k}.pb"), kind))
                k += 1
        except Exception as e:  # noqa: BLE001
            return "error", f"{ds_name}: reading data: {type(e).__name__}: {e}"

        try:
            if len(inputs) != len(input_names):
                return "error", (
                    f"{ds_name}: {len(inputs)} input files but model has "
                    f"{len(input_names)} inputs"
                )
            feed = {n: to_ort_feed(v) for n, v in zip(input_names, inputs)}
            if raw_path:
                # run_with_ort_values wants every feed as an OrtValue.
                feed = {
                    n: ort.OrtValue.ortvalue_from_numpy(v) if hasattr(v, "dtype") else v
                    for n, v in feed.items()
                }
                outs = sess.run_with_ort_values(None, feed)
                actual = [from_ort_value_raw(o) for o in outs]
            else:
                actual = [from_ort_numpy(o) for o in sess.run(None, feed)]
        except Exception as e:  # noqa: BLE001
            return "error", f"{ds_name}: ORT run: {type(e).__name__}: {e}"

        if len(actual) != len(expected):
            return "fail", f"{ds_name}: {len(actual)} outputs != expected {len(expected)}"
        for k, (e, a) in enumerate(zip(expected, actual)):
            kind = out_kinds[k] if k < len(out_kinds) else "tensor"
            try:
                compare_value(e, a, kind, rtol, atol)
            except Mismatch as m:
                name = meta["outputs"][k]["name"] if k < len(meta["outputs"]) else "?"
                return "fail", f"{ds_name}: output {k} ({name}): {m}"
            except Exception as ex:  # noqa: BLE001
                return "error", f"{ds_name}: comparing output {k}: {type(ex).__name__}: {ex}"
    return "pass", ""


def worker_main(conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.simplefilter("ignore")
    import onnxruntime  # noqa: F401  (import once, up front)

    while True:
        try:
            test_dir = conn.recv()
        except EOFError:
            return
        if test_dir is None:
            return
        try:
            result = run_test(test_dir)
        except Exception as e:  # noqa: BLE001
            result = ("error", f"harness: {type(e).__name__}: {e}: {traceback.format_exc(limit=3)}")
        conn.send(result)


# --------------------------------------------------------------------------
# Parent: a small crash- and hang-tolerant process pool.
# --------------------------------------------------------------------------
class Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.test = None
        self.started = 0.0

    def kill(self):
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(5)
        self.conn.close()


def clean(detail: str) -> str:
    detail = " ".join(str(detail).split())  # no tabs / newlines
    return detail if len(detail) <= 400 else detail[:397] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description="Run ONNX node tests through onnxruntime.")
    ap.add_argument("datadir")
    ap.add_argument("outfile")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=60.0, help="per test, seconds")
    ap.add_argument("--filter", default="", help="only tests whose name contains this")
    args = ap.parse_args()

    datadir = os.path.abspath(args.datadir)
    tests = sorted(
        e.name
        for e in os.scandir(datadir)
        if e.is_dir()
        and args.filter in e.name
        and os.path.exists(os.path.join(e.path, "model.onnx"))
    )
    if not tests:
        print(f"error: no tests found in {datadir}", file=sys.stderr)
        return 2

    ctx = mp.get_context("spawn")
    jobs = max(1, min(args.jobs, len(tests)))
    results: dict[str, tuple[str, str]] = {}
    pending = deque(tests)
    workers = [Worker(ctx) for _ in range(jobs)]
    t0 = time.monotonic()
    last_report = t0

    try:
        while pending or any(w.test for w in workers):
            for w in workers:
                if w.test is None and pending:
                    w.test = pending.popleft()
                    w.started = time.monotonic()
                    try:
                        w.conn.send(os.path.join(datadir, w.test))
                    except OSError:
                        pass  # worker died; noticed below via its sentinel
            busy = [w for w in workers if w.test]
            now = time.monotonic()
            left = min(args.timeout - (now - w.started) for w in busy)
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], max(0.0, left) + 0.05)
            for i, w in enumerate(workers):
                if w.test is None:
                    continue
                result = None
                try:
                    if w.conn.poll():
                        result = w.conn.recv()
                except (EOFError, OSError):
                    result = None
                if result is not None:
                    results[w.test] = result
                    w.test = None
                    continue
                dead = not w.proc.is_alive()
                timed_out = time.monotonic() - w.started > args.timeout
                if dead or timed_out:
                    if dead:
                        code = w.proc.exitcode
                        why = (
                            f"worker crashed (signal {-code})" if code and code < 0
                            else f"worker exited (code {code})"
                        )
                    else:
                        why = f"timeout after {args.timeout:g}s"
                    results[w.test] = ("error", why)
                    w.kill()
                    workers[i] = Worker(ctx)
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                print(
                    f"  ... {len(results)}/{len(tests)} done "
                    f"({time.monotonic() - t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except Exception:  # noqa: BLE001
                pass
        for w in workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()

    outfile = os.path.abspath(args.outfile)
    os.makedirs(os.path.dirname(outfile), exist_ok=True)
    tmp = f"{outfile}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for name in tests:
            status, detail = results[name]
            detail = str(detail).replace(datadir + os.sep, "")  # path-independent
            f.write(f"{name}\t{status}\t{clean(detail)}\n")
    os.replace(tmp, outfile)

    counts = {"pass": 0, "fail": 0, "error": 0}
    for status, _ in results.values():
        counts[status] = counts.get(status, 0) + 1
    print(
        f"ORT: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} error "
        f"in {time.monotonic() - t0:.0f}s -> {outfile}",
        file=sys.stderr,
    )
    print(f"ORT: passed {counts['pass']} of {len(tests)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
