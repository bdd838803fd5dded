"""`kiln serve`'s TensorFlow Serving gRPC API driven by TF Serving's official Python API package
(`tensorflow-serving-api`: `predict_pb2`, `prediction_service_pb2_grpc`, `get_model_metadata_pb2`,
`model_service_pb2_grpc`, used unchanged). That package imports a few `tensorflow.core` message
modules without TensorFlow itself being installed; they are generated here from the `tensorflow/`
protos Kiln's server compiles (crates/kiln-serve/proto/tensorflow), while every
`tensorflow.serving` message comes from the official package, so a field-number mismatch between
Kiln's TF Serving protos and the published ones fails this test. Outputs are checked against
onnxruntime on the same model files and against Kiln's KServe v2 answers.

    python crates/kiln-serve/tests/python/tfserving_grpc_test.py path/to/kiln
    python crates/kiln-serve/tests/python/tfserving_grpc_test.py --grpc HOST:PORT   # a running server

Needs the venv from `scripts/setup-python.sh serve` (tensorflow-serving-api installed without its
TensorFlow dependency, grpcio-tools). Prints 'N passed, M failed'; exits non-zero on failure.
"""
import argparse
import concurrent.futures
import os
import sys
import tempfile
import traceback

import grpc
import kiln_server  # noqa: E402  (this folder)
import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
REPO = os.path.join(ROOT, "models", "repository")
PROTO = os.path.join(ROOT, "crates", "kiln-serve", "proto")


def generate_tensorflow_modules():
    """Compiles Kiln's `tensorflow/` (and `xla/`) protos to Python modules in a temporary directory and puts it on
    sys.path, so `tensorflow.core.framework.tensor_pb2` and friends import as TF Serving's API
    package expects."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="kiln-tfproto-")
    files = []
    for d, _, names in [w for top in ("tensorflow", "xla") for w in os.walk(os.path.join(PROTO, top))]:
        files += [os.path.relpath(os.path.join(d, n), PROTO) for n in names if n.endswith(".proto")]
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}"] + sorted(files))
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {files}")
    sys.path.insert(0, out)


generate_tensorflow_modules()
from google.protobuf import wrappers_pb2  # noqa: E402
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import classification_pb2  # noqa: E402
from tensorflow_serving.apis import get_model_metadata_pb2  # noqa: E402
from tensorflow_serving.apis import get_model_status_pb2  # noqa: E402
from tensorflow_serving.apis import model_service_pb2_grpc  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402

NP_TO_TF = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.uint8): types_pb2.DT_UINT8,
    np.dtype(np.bool_): types_pb2.DT_BOOL,
}
TF_TO_NP = {v: k for k, v in NP_TO_TF.items()}


def make_tensor_proto(arr, typed=False):
    """What `tf.make_tensor_proto` builds: dtype, shape and either tensor_content (TensorFlow's
    choice for numeric arrays) or the dtype's typed field."""
    arr = np.asarray(arr)
    t = tensor_pb2.TensorProto(dtype=NP_TO_TF[arr.dtype])
    t.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in arr.shape]))
    if not typed:
        t.tensor_content = arr.tobytes()
    elif arr.dtype == np.float32:
        t.float_val.extend(arr.flatten().tolist())
    elif arr.dtype == np.int32:
        t.int_val.extend(arr.flatten().tolist())
    elif arr.dtype == np.int64:
        t.int64_val.extend(arr.flatten().tolist())
    else:
        raise ValueError(arr.dtype)
    return t


def make_ndarray(t):
    """What `tf.make_ndarray` returns for the numeric tensors Kiln answers with."""
    shape = [d.size for d in t.tensor_shape.dim]
    dtype = TF_TO_NP[t.dtype]
    if t.tensor_content:
        return np.frombuffer(t.tensor_content, dtype=dtype).reshape(shape)
    field = {types_pb2.DT_FLOAT: t.float_val, types_pb2.DT_INT32: t.int_val, types_pb2.DT_INT64: t.int64_val}[t.dtype]
    return np.array(field, dtype=dtype).reshape(shape)


def ort_run(model, feeds):
    path = os.path.join(REPO, model, "1", "model.onnx")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))), sess


def start(kiln):
    proc, _, grpc_addr, _ = kiln_server.start(kiln, REPO)
    return proc, grpc_addr


def predict_request(model, inputs, version=None, signature="", output_filter=(), typed=False):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
    for name, arr in inputs.items():
        req.inputs[name].CopyFrom(make_tensor_proto(arr, typed=typed))
    req.output_filter.extend(output_filter)
    return req


def expect_code(fn, code, contains=""):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"wanted {code}, got {e.code()}: {e.details()}"
        assert contains in e.details(), f"{contains!r} not in {e.details()!r}"
        return e.details()
    raise AssertionError(f"wanted {code}, the call succeeded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln", nargs="?", help="the kiln binary (starts its own server)")
    ap.add_argument("--grpc", help="HOST:PORT of a running kiln serve with models/repository")
    args = ap.parse_args()
    proc = None
    if args.grpc:
        grpc_addr = args.grpc
    elif args.kiln:
        proc, grpc_addr = start(args.kiln)
    else:
        ap.error("give the kiln binary or --grpc")

    channel = grpc.insecure_channel(grpc_addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want, mlp_sess = ort_run("mlp", {"input": x})
    passed, failed = 0, 0

    def check(name, fn):
        nonlocal passed, failed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()

    def predict_content():
        resp = predict.Predict(predict_request("mlp", {"input": x}), timeout=30)
        assert set(resp.outputs) == {"logits", "probabilities"}, list(resp.outputs)
        for k in want:
            got = make_ndarray(resp.outputs[k])
            assert got.shape == want[k].shape, (k, got.shape)
            np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-6)
        assert resp.model_spec.name == "mlp"
        assert resp.model_spec.version.value == 1
        assert resp.model_spec.signature_name == "serving_default"

    def predict_typed_equals_content():
        a = predict.Predict(predict_request("mlp", {"input": x}), timeout=30)
        b = predict.Predict(predict_request("mlp", {"input": x}, typed=True), timeout=30)
        for k in want:
            assert a.outputs[k].tensor_content == b.outputs[k].tensor_content, k

    def predict_version_signature_filter():
        resp = predict.Predict(predict_request("mlp", {"input": x}, version=1, signature="serving_default",
                                               output_filter=["probabilities"]), timeout=30)
        assert list(resp.outputs) == ["probabilities"], list(resp.outputs)
        np.testing.assert_allclose(make_ndarray(resp.outputs["probabilities"]), want["probabilities"],
                                   rtol=1e-5, atol=1e-6)

    def predict_int32_model():
        a = rng.integers(-1000, 1000, (1, 16)).astype(np.int32)
        b = rng.integers(-1000, 1000, (1, 16)).astype(np.int32)
        ref, _ = ort_run("simple", {"INPUT0": a, "INPUT1": b})
        for typed in (False, True):
            resp = predict.Predict(predict_request("simple", {"INPUT0": a, "INPUT1": b}, typed=typed), timeout=30)
            for k in ("OUTPUT0", "OUTPUT1"):
                np.testing.assert_array_equal(make_ndarray(resp.outputs[k]), ref[k])

    def predict_concurrent():
        xs = [rng.standard_normal((1 + i % 5, 4)).astype(np.float32) for i in range(48)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            resps = list(pool.map(lambda a: predict.Predict(predict_request("mlp", {"input": a}), timeout=60), xs))
        for a, r in zip(xs, resps):
            ref = mlp_sess.run(["logits"], {"input": a})[0]
            np.testing.assert_allclose(make_ndarray(r.outputs["logits"]), ref, rtol=1e-5, atol=1e-6)

    def metadata():
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "mlp"
        req.metadata_field.append("signature_def")
        resp = predict.GetModelMetadata(req, timeout=30)
        assert resp.model_spec.name == "mlp" and resp.model_spec.version.value == 1
        sigs = get_model_metadata_pb2.SignatureDefMap()
        assert resp.metadata["signature_def"].Unpack(sigs), resp.metadata["signature_def"].type_url
        sig = sigs.signature_def["serving_default"]
        assert sig.method_name == "tensorflow/serving/predict"
        for io, infos in ((mlp_sess.get_inputs(), sig.inputs), (mlp_sess.get_outputs(), sig.outputs)):
            assert sorted(i.name for i in io) == sorted(infos), (list(infos), [i.name for i in io])
            for i in io:
                info = infos[i.name]
                assert info.name == i.name
                assert info.dtype == types_pb2.DT_FLOAT, info
                assert [d.size for d in info.tensor_shape.dim][1:] == list(i.shape[1:]), (info, i.shape)
                assert info.tensor_shape.dim[0].size == -1  # the batch dimension
        expect_code(lambda: predict.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=req.model_spec, metadata_field=["nope"]), timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
            "signature_def")

    def status():
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "mlp"
        resp = models.GetModelStatus(req, timeout=30)
        assert len(resp.model_version_status) == 1, resp
        s = resp.model_version_status[0]
        assert s.version == 1 and s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE, s
        assert s.status.error_code == 0, s
        req.model_spec.version.value = 9
        expect_code(lambda: models.GetModelStatus(req, timeout=30), grpc.StatusCode.NOT_FOUND)

    def bad_requests_then_still_serving():
        C = grpc.StatusCode
        expect_code(lambda: predict.Predict(predict_request("no_such_model", {"input": x}), timeout=30), C.NOT_FOUND)
        expect_code(lambda: predict.Predict(predict_request("mlp", {"input": x}, version=7), timeout=30),
                    C.NOT_FOUND)
        expect_code(lambda: predict.Predict(predict_request("mlp", {"input": x}, signature="classify"), timeout=30),
                    C.INVALID_ARGUMENT, "serving_default")
        req = predict_request("mlp", {"input": x})
        req.model_spec.version_label = "stable"
        expect_code(lambda: predict.Predict(req, timeout=30), C.INVALID_ARGUMENT, "label")
        # wrong dtype, wrong input name, truncated content, a wrong typed field
        expect_code(lambda: predict.Predict(predict_request("mlp", {"input": x.astype(np.float64)}), timeout=30),
                    C.INVALID_ARGUMENT)
        expect_code(lambda: predict.Predict(predict_request("mlp", {"wrong": x}), timeout=30), C.INVALID_ARGUMENT)
        req = predict_request("mlp", {"input": x})
        req.inputs["input"].tensor_content = req.inputs["input"].tensor_content[:-3]
        expect_code(lambda: predict.Predict(req, timeout=30), C.INVALID_ARGUMENT, "bytes")
        req = predict_request("mlp", {"input": x})
        req.inputs["input"].ClearField("tensor_content")
        req.inputs["input"].int_val.extend([1] * 12)
        expect_code(lambda: predict.Predict(req, timeout=30), C.INVALID_ARGUMENT, "float_val")
        # one value standing for a 4 TB tensor
        huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
        huge.tensor_shape.dim.add(size=1 << 20)
        huge.tensor_shape.dim.add(size=1 << 20)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "mlp"
        req.inputs["input"].CopyFrom(huge)
        expect_code(lambda: predict.Predict(req, timeout=30), C.INVALID_ARGUMENT, "limit")
        # Classify takes tf.Example inputs: not served
        creq = classification_pb2.ClassificationRequest()
        creq.model_spec.name = "mlp"
        expect_code(lambda: predict.Classify(creq, timeout=30), C.UNIMPLEMENTED)
        predict_content()

    check("Predict: tensor_content in, outputs match onnxruntime", predict_content)
    check("Predict: typed float_val input gives the same bytes", predict_typed_equals_content)
    check("Predict: version, signature_name, output_filter", predict_version_signature_filter)
    check("Predict: INT32 model, content and int_val, exact", predict_int32_model)
    check("Predict: 48 concurrent requests of mixed batch sizes", predict_concurrent)
    check("GetModelMetadata: SignatureDefMap in Any matches the model", metadata)
    check("ModelService.GetModelStatus", status)
    check("bad requests get clear gRPC errors; the server keeps serving", bad_requests_then_still_serving)

    channel.close()
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
