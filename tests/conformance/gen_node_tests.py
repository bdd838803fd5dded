#!/usr/bin/env python3
"""Write the official ONNX node test suite to OUTDIR.

Usage: gen_node_tests.py OUTDIR

Test cases come from ``onnx.backend.test.case.node.collect_testcases()``. In
onnx 1.23 ``backend-test-tools generate-data`` only writes the *model* tests,
so we feed the node cases through that very same writer
(``onnx.backend.test.cmd_tools.generate_data``) to get byte-for-byte the
layout and protobuf encoding onnx itself produces:

    OUTDIR/<test_name>/model.onnx
    OUTDIR/<test_name>/test_data_set_0/input_<K>.pb   (graph input order)
    OUTDIR/<test_name>/test_data_set_0/output_<K>.pb  (graph output order)
    OUTDIR/<test_name>/meta.json
    OUTDIR/.complete                                  (contains the onnx version)

Each .pb holds a TensorProto, SequenceProto, OptionalProto or MapProto,
depending on the kind of the corresponding graph input/output (recorded in
meta.json as "tensor" / "sequence" / "optional" / "map").

meta.json: {"rtol": float, "atol": float,
            "inputs":  [{"name": str, "kind": str}, ...],
            "outputs": [{"name": str, "kind": str}, ...]}
rtol/atol are the values carried by the onnx TestCase object.

Many node cases draw random data with an unseeded ``np.random``; we seed the
global numpy RNG with 0 before collecting, so the output is reproducible for a
given onnx/numpy version.

Idempotent: exits immediately if OUTDIR/.complete holds the installed onnx
version. Otherwise the suite is generated in a temporary sibling directory and
moved into place, so OUTDIR is never left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings

MARKER = ".complete"
RESULTS_FILE = "ort_results.tsv"  # written by ort_rates.py; stale after a regen


def value_kind(type_proto) -> str:
    which = type_proto.WhichOneof("value")
    return {
        "tensor_type": "tensor",
        "sequence_type": "sequence",
        "optional_type": "optional",
        "map_type": "map",
    }.get(which, str(which))


def io_meta(value_infos) -> list[dict]:
    return [{"name": vi.name, "kind": value_kind(vi.type)} for vi in value_infos]


def looks_like_ours(path: str) -> bool:
    """True if every entry in an existing OUTDIR is something this script
    (or ort_rates.py) writes, so it is safe to replace it wholesale."""
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if entry in (MARKER, RESULTS_FILE) or entry.startswith("ort_"):
            continue
        if os.path.isdir(full) and (
            os.path.exists(os.path.join(full, "model.onnx"))
            or os.path.exists(os.path.join(full, "meta.json"))
            or not os.listdir(full)
        ):
            continue
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("outdir")
    ap.add_argument(
        "--force", action="store_true", help="regenerate even if the marker matches"
    )
    args = ap.parse_args()

    import numpy as np
    import onnx

    outdir = os.path.abspath(args.outdir)
    marker_path = os.path.join(outdir, MARKER)
    version = onnx.__version__

    if not args.force and os.path.isfile(marker_path):
        with open(marker_path, encoding="utf-8") as f:
            if f.read().strip() == version:
                n = sum(
                    1
                    for e in os.scandir(outdir)
                    if e.is_dir() and os.path.exists(os.path.join(e.path, "model.onnx"))
                )
                print(f"node tests already generated for onnx {version} in {outdir}")
                print(f"node tests: {n}")
                return 0

    if os.path.exists(outdir) and not looks_like_ours(outdir):
        print(
            f"error: {outdir} exists and contains files not written by this script; "
            "refusing to replace it",
            file=sys.stderr,
        )
        return 2

    import onnx.backend.test.case.node as node_cases
    from onnx.backend.test import cmd_tools

    t0 = time.monotonic()
    np.random.seed(0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # The case generators intentionally overflow / divide by zero.
        warnings.simplefilter("ignore")
        cases = list(node_cases.collect_testcases(None))
    t1 = time.monotonic()
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        print("error: duplicate node test names", file=sys.stderr)
        return 1

    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(outdir)}.tmp.{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        # Reuse onnx's own writer. It iterates model_test.collect_testcases() and
        # writes to <output>/<case.kind>/<case.name>; node cases have kind "node".
        orig = cmd_tools.model_test.collect_testcases
        cmd_tools.model_test.collect_testcases = lambda: cases
        try:
            cmd_tools.generate_data(argparse.Namespace(output=tmp))
        finally:
            cmd_tools.model_test.collect_testcases = orig

        written = os.path.join(tmp, "node")
        for case in cases:
            case_dir = os.path.join(written, case.name)
            meta = {
                "rtol": float(case.rtol),
                "atol": float(case.atol),
                "inputs": io_meta(case.model.graph.input),
                "outputs": io_meta(case.model.graph.output),
            }
            with open(os.path.join(case_dir, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
                f.write("\n")
        with open(os.path.join(written, MARKER), "w", encoding="utf-8") as f:
            f.write(version + "\n")

        # Swap into place: the old directory (if any) is ours; remove it.
        if os.path.exists(outdir):
            old = os.path.join(parent, f".{os.path.basename(outdir)}.old.{os.getpid()}")
            os.rename(outdir, old)
            os.rename(written, outdir)
            shutil.rmtree(old)
        else:
            os.rename(written, outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t2 = time.monotonic()

    print(
        f"wrote {len(cases)} node tests (onnx {version}) to {outdir} "
        f"[collect {t1 - t0:.1f}s, write {t2 - t1:.1f}s]"
    )
    print(f"node tests: {len(cases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
