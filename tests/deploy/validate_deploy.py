#!/usr/bin/env python3
"""Offline validation of the deployment files under deploy/ (run by tests/deploy/validate.sh).

  kubernetes/  every manifest against the pinned Kubernetes versions' schemas (kubernetes-validate,
               strict: unknown fields fail, and so does an unknown kind), then the references
               between them (labels and selectors, named ports, volumes, ConfigMaps, the HPA's
               target and metric, quantities, the restricted pod security profile, the drain
               time against request_timeout_ms) and the kustomizations (rendered with
               `kubectl kustomize` where kubectl exists).
  kserve/      ServingRuntime / InferenceService against tests/deploy/kserve.schema.json (its
               Kubernetes types resolved against the same pinned definitions), and the runtime
               and the services against each other.
  compose/     `docker-compose config` of compose.yaml and of compose.yaml + compose.gpu.yaml,
               bind-mount sources present in the tree, the healthcheck, ports, the Prometheus
               scrape target, Grafana provisioning, and every dashboard query.
  Dockerfiles  hadolint on each deploy/**/Dockerfile* (none found is a failure).

Everywhere: YAML with a duplicated key fails; config.toml contents are checked against the
fields of crates/kiln-serve/src/config.rs; PromQL (dashboards, the Prometheus adapter rule) must
parse and may only name metrics and labels that crates/kiln-serve/src/{metrics,llm,gpu_metrics}.rs
define; a .yaml/.yml/.json/.toml file under deploy/ that no check reads is a failure.

--self-check then copies deploy/ to a temporary tree, breaks it in one way at a time and
requires each break to be reported, so that the validation cannot pass vacuously.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import promql_parser
import referencing
import yaml
import kubernetes_validate.utils as kv

# The oldest Kubernetes these manifests support (the preStop sleep action is on by default
# from 1.30) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"

# kubernetes-validate reads its JSON schema files and lists its versions for every resource;
# neither changes while this runs.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
kv.all_versions = functools.lru_cache(maxsize=None)(kv.all_versions)

HERE = Path(__file__).resolve().parent
KSERVE_SCHEMA = HERE / "kserve.schema.json"
HADOLINT_CONFIG = HERE / "hadolint.yaml"

METRIC_SOURCES = (
    "crates/kiln-serve/src/metrics.rs",
    "crates/kiln-serve/src/llm.rs",
    "crates/kiln-serve/src/gpu_metrics.rs",
)
CONFIG_SOURCE = "crates/kiln-serve/src/config.rs"
# Labels a scrape adds (job/instance; namespace/pod from Kubernetes discovery) and `le` of
# histogram buckets.
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "le", "__name__"}
# Kubernetes' quantity syntax (k8s.io/apimachinery resource.Quantity).
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?$")
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Report:
    root: Path
    errors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    checked: set = field(default_factory=set)
    counts: dict = field(default_factory=dict)

    def rel(self, path) -> str:
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    def error(self, path, msg: str) -> None:
        self.errors.append((self.rel(path), msg))

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def seen(self, path, kind: str) -> None:
        self.checked.add(self.rel(path))
        self.counts[kind] = self.counts.get(kind, 0) + 1


# ---------------------------------------------------------------------------------------------
# YAML with duplicate keys rejected (PyYAML keeps the last one silently).


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    pass


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml_docs(path: Path, rep: Report) -> list | None:
    try:
        docs = list(yaml.load_all(path.read_text(), Loader=StrictLoader))
    except (yaml.YAMLError, OSError) as e:
        rep.error(path, f"YAML: {e}")
        return None
    return [d for d in docs if d is not None]


def load_yaml_text(text: str, where, rep: Report):
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        rep.error(where, f"YAML: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# What the source defines: metrics and labels, config.toml fields.


@dataclass
class Catalogue:
    metrics: set
    histograms: set
    labels: set
    literals: set


def metric_catalogue(root: Path, rep: Report) -> Catalogue:
    text = ""
    for rel in METRIC_SOURCES:
        p = root / rel
        if not p.is_file():
            rep.error(p, "metric definitions not found (the dashboard and autoscaler checks need them)")
            continue
        text += p.read_text()
    metrics = set(re.findall(r'"((?:nv|kiln|process)_[A-Za-z0-9_:]+)"', text))
    histograms = set(re.findall(r'(?:HistogramOpts::new|hist)\(\s*"([^"]+)"', text))
    labels = {s for arr in re.findall(r"&\[([^\]]*)\]", text) for s in re.findall(r'"([a-z_]+)"', arr)}
    literals = set(re.findall(r'"([A-Za-z0-9_]+)"', text))
    if not metrics or not histograms or not {"model", "version"} <= labels:
        rep.error(root / METRIC_SOURCES[0], "could not read the metric names and labels from the source")
    return Catalogue(metrics, histograms, labels | SCRAPE_LABELS, literals)


def config_fields(root: Path, rep: Report) -> dict:
    """{struct name: {field: type}} of the serde structs in config.rs."""
    p = root / CONFIG_SOURCE
    if not p.is_file():
        rep.error(p, "not found: config.toml contents cannot be checked")
        return {}
    structs = {}
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", p.read_text(), re.S):
        structs[m.group(1)] = dict(re.findall(r"^\s*pub (\w+)\s*:\s*([^,\n]+),", m.group(2), re.M))
    if "ModelConfig" not in structs:
        rep.error(p, "struct ModelConfig not found: config.toml contents cannot be checked")
        return {}
    return structs


def check_model_config(text: str, where, structs: dict, rep: Report) -> dict | None:
    """Parses a config.toml and checks every key against config.rs. Returns the table."""
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        rep.error(where, f"config.toml: {e}")
        return None
    if not structs:
        return cfg

    def walk(table: dict, struct: str, prefix: str) -> None:
        fields = structs[struct]
        for key, value in table.items():
            if key not in fields:
                rep.error(where, f"config.toml: unknown key {prefix}{key} (fields of {struct}: "
                                 f"{', '.join(sorted(fields))})")
                continue
            inner = re.sub(r"^Option<(.*)>$", r"\1", fields[key].strip())
            if inner in structs:
                if not isinstance(value, dict):
                    rep.error(where, f"config.toml: {prefix}{key} must be a table [{prefix}{key}]")
                else:
                    walk(value, inner, f"{prefix}{key}.")
            elif isinstance(value, dict):
                rep.error(where, f"config.toml: {prefix}{key} is a value, not a table")

    walk(cfg, "ModelConfig", "")
    group = cfg.get("instance_group")
    device = group.get("device", "cpu") if isinstance(group, dict) else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        rep.error(where, f"config.toml: instance_group.device {device!r}: use cpu, cuda or cuda:N")
    return cfg


# ---------------------------------------------------------------------------------------------
# PromQL


def check_promql(expr: str, where, what: str, cat: Catalogue, rep: Report) -> set:
    """Parses `expr` and checks its metric and label names. Returns the metric names used."""
    try:
        ast = promql_parser.parse(expr)
    except (ValueError, TypeError) as e:
        rep.error(where, f"{what}: PromQL does not parse ({e}): {expr}")
        return set()
    used = set()

    def label_ok(name: str, context: str) -> None:
        if name not in cat.labels:
            rep.error(where, f"{what}: label {name!r} ({context}) is not one Kiln exports "
                             f"({', '.join(sorted(cat.labels))})")

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name:
                used.add(name)
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name in cat.histograms:
                    rep.error(where, f"{what}: {name} is a histogram: use {name}_bucket, _sum or _count")
                elif name not in cat.metrics and not (base != name and base in cat.histograms):
                    rep.error(where, f"{what}: metric {name} is not defined by kiln-serve")
            for m in node.matchers.matchers:
                label_ok(m.name, "matcher")
                if m.name in ("stat", "reason") and str(m.op).endswith(("Equal", "Re")):
                    for v in m.value.split("|"):
                        if v not in cat.literals:
                            rep.error(where, f"{what}: {m.name}={v!r} is not a value Kiln exports")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            for lab in node.modifier.labels:
                label_ok(lab, "grouping")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            for lab in (getattr(matching, "labels", None) or []):
                label_ok(lab, "vector matching")
        return None

    promql_parser.walk(ast, visit)
    return used


# ---------------------------------------------------------------------------------------------
# Kubernetes


_RUNS = {}


def run_tool(cmd: list, inputs: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `cmd`; the same command over inputs with the same contents is answered from memory
    (the self-check validates many copies that differ in one file)."""
    key = [tuple(cmd), tuple(sorted((env or {}).items()))]
    for p in sorted(set(inputs)):
        try:
            key.append((str(p), p.read_bytes() if p.is_file() else b"<dir>"))
        except OSError:
            key.append((str(p), b"<unreadable>"))
    key = hashlib.sha256(repr(key).encode()).hexdigest()
    if key not in _RUNS:
        _RUNS[key] = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return _RUNS[key]


def parse_quantity(q) -> float | None:
    s = str(q)
    m = QUANTITY.match(s)
    if not m:
        return None
    num, suf = float(m.group(1)), m.group(3) or ""
    if len(suf) > 1 and suf[0] in "eE":
        return num * 10 ** int(suf[1:])
    return num * SUFFIX[suf]


def k8s_schema_check(doc: dict, where, rep: Report) -> None:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        rep.error(where, "not a Kubernetes object (apiVersion and kind are required)")
        return
    for msg in _k8s_schema_errors(json.dumps(doc, sort_keys=True, default=str)):
        rep.error(where, msg)


@functools.lru_cache(maxsize=None)
def _k8s_schema_errors(doc_json: str) -> tuple:
    doc = json.loads(doc_json)
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = f"{doc.get('kind')}/{meta.get('name', '?')}"
    out = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            out.append(f"{name}: Kubernetes {version} schema (strict): {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            out.append(f"{name}: {e.message}")
        except kv.VersionNotSupportedError as e:
            out.append(f"kubernetes-validate: {e.message}")
        except Exception as e:  # noqa: BLE001 - anything else is a failed check too
            out.append(f"{name}: could not be validated: {e}")
    return tuple(out)


def labels_match(selector: dict, labels: dict) -> bool:
    ml = (selector or {}).get("matchLabels", selector or {})
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def check_container_security(c: dict, pod_sc: dict, where, who: str, rep: Report) -> None:
    sc = c.get("securityContext") or {}
    merged = {**(pod_sc or {}), **sc}
    if merged.get("runAsNonRoot") is not True:
        rep.error(where, f"{who}: runAsNonRoot must be true")
    if not isinstance(merged.get("runAsUser"), int) or merged.get("runAsUser") == 0:
        rep.error(where, f"{who}: runAsUser must be a non-zero number (a named image user cannot be verified)")
    if sc.get("readOnlyRootFilesystem") is not True:
        rep.error(where, f"{who}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        rep.error(where, f"{who}: allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        rep.error(where, f"{who}: capabilities.drop must contain ALL")
    if (merged.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        rep.error(where, f"{who}: seccompProfile RuntimeDefault is required by the restricted profile")


def check_resources(res: dict, where, who: str, rep: Report, need_limits=True) -> None:
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    if not req.get("cpu") or not req.get("memory"):
        rep.error(where, f"{who}: resources.requests needs cpu and memory")
    if need_limits and not lim.get("memory"):
        rep.error(where, f"{who}: resources.limits needs memory")
    for kind, values in (("requests", req), ("limits", lim)):
        for k, v in values.items():
            if parse_quantity(v) is None:
                rep.error(where, f"{who}: resources.{kind}.{k} {v!r} is not a Kubernetes quantity")
    for k, v in req.items():
        if k in lim and parse_quantity(v) is not None and parse_quantity(lim[k]) is not None \
                and parse_quantity(v) > parse_quantity(lim[k]):
            rep.error(where, f"{who}: resources.requests.{k} {v} is above the limit {lim[k]}")


def probe_port_ok(probe: dict, port_names: set, port_numbers: set) -> bool:
    port = (probe.get("httpGet") or {}).get("port")
    return port in port_names or port in port_numbers


def check_kubernetes(root: Path, structs: dict, cat: Catalogue, rep: Report, kubectl: str | None) -> None:
    kdir = root / "deploy" / "kubernetes"
    if not kdir.is_dir():
        rep.error(kdir, "missing")
        return
    objects = []  # (path, doc)
    kustomizations = []
    for path in sorted(kdir.rglob("*")):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        docs = load_yaml_docs(path, rep)
        rep.seen(path, "kubernetes")
        if docs is None:
            continue
        if path.name in ("kustomization.yaml", "kustomization.yml"):
            kustomizations.append((path, docs[0] if docs else {}))
            continue
        if not docs:
            rep.error(path, "no Kubernetes object in the file")
        for doc in docs:
            k8s_schema_check(doc, path, rep)
            if isinstance(doc, dict):
                objects.append((path, doc))
    rep.counts["kubernetes objects"] = len(objects)

    # Kustomizations: listed files exist and every manifest is listed by one.
    listed = set()
    for path, kz in kustomizations:
        if not isinstance(kz, dict) or kz.get("kind") != "Kustomization":
            rep.error(path, "not a Kustomization")
            continue
        resources = kz.get("resources") or []
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            rep.error(path, "resources must be a list of paths")
            continue
        for res in resources:
            target = (path.parent / res).resolve()
            if not target.exists():
                rep.error(path, f"resource {res} does not exist")
            listed.add(target)
    for path, _ in objects:
        if path.resolve() not in listed:
            rep.error(path, "not listed in any kustomization.yaml (kubectl apply -k would skip it)")
    if kubectl:
        for path, _ in kustomizations:
            run = run_tool([kubectl, "kustomize", str(path.parent)], list(path.parent.rglob("*")))
            if run.returncode != 0:
                rep.error(path, f"kubectl kustomize failed: {run.stderr.strip()}")
                continue
            rendered = list(yaml.load_all(run.stdout, Loader=StrictLoader))
            for doc in rendered:
                if doc:
                    k8s_schema_check(doc, path, rep)
            rep.counts["kustomize renders"] = rep.counts.get("kustomize renders", 0) + 1
    else:
        rep.note("kubectl not found: kustomizations checked by their file lists only, not rendered")

    by_kind = {}
    for path, doc in objects:
        by_kind.setdefault(str(doc.get("kind")), []).append((path, doc))

    def named(kind, name):
        return [d for _, d in by_kind.get(kind, []) if (d.get("metadata") or {}).get("name") == name]

    # Model configs carried by ConfigMaps.
    request_timeouts, adapter_metrics = {}, set()
    for path, cm in by_kind.get("ConfigMap", []):
        def configmap(path=path, cm=cm):
            for key, text in (cm.get("data") or {}).items():
                if key == "config.toml":
                    cfg = check_model_config(str(text), path, structs, rep)
                    if cfg is not None:
                        request_timeouts[cm["metadata"]["name"]] = cfg.get("request_timeout_ms")
                    rep.counts["config.toml"] = rep.counts.get("config.toml", 0) + 1
                elif key == "config.yaml" and "prometheus-adapter" in str(path):
                    adapter_metrics.update(check_adapter_config(str(text), path, cat, rep))
        guarded(rep, path, configmap)

    for path, dep in by_kind.get("Deployment", []):
        guarded(rep, path, check_deployment, path, dep, named, request_timeouts, rep)

    pod_labels, ports = [], {}
    for path, d in by_kind.get("Deployment", []):
        def collect(d=d):
            pod_labels.append(d["spec"]["template"]["metadata"]["labels"])
            for c in d["spec"]["template"]["spec"].get("containers", []):
                for p in c.get("ports", []):
                    ports[p.get("name")] = p.get("containerPort")
        guarded(rep, path, collect)
    for path, svc in by_kind.get("Service", []):
        guarded(rep, path, check_service, path, svc, pod_labels, ports, rep)
    for path, pdb in by_kind.get("PodDisruptionBudget", []):
        if not guarded(rep, path, lambda: any(labels_match(pdb["spec"]["selector"], lab) for lab in pod_labels)):
            rep.error(path, "PodDisruptionBudget selector matches no Deployment's pod labels")
    for path, hpa in by_kind.get("HorizontalPodAutoscaler", []):
        guarded(rep, path, check_hpa, path, hpa, named, adapter_metrics, rep)


def guarded(rep: Report, path, fn, *args):
    """Runs one semantic check; content too malformed for it (a wrong type the schema check
    reports anyway) is a failure of that file, not a crash that would hide the other results."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        rep.error(path, f"cannot check this content ({type(e).__name__}: {e})")
        return None


def check_service(path, svc, pod_labels, ports, rep: Report) -> None:
    spec = svc.get("spec") or {}
    if not any(labels_match(spec.get("selector"), lab) for lab in pod_labels):
        rep.error(path, "Service selector matches no Deployment's pod labels")
    names = {p.get("name") for p in spec.get("ports", [])}
    for want in ("http", "grpc", "metrics"):
        if want not in names:
            rep.error(path, f"Service has no port named {want}")
    for p in spec.get("ports", []):
        tp = p.get("targetPort")
        if isinstance(tp, str) and tp not in ports:
            rep.error(path, f"Service port {p.get('name')}: targetPort {tp!r} is no container port name")
        if isinstance(tp, int) and tp not in ports.values():
            rep.error(path, f"Service port {p.get('name')}: targetPort {tp} is no container port")


def check_hpa(path, hpa, named, adapter_metrics, rep: Report) -> None:
    spec = hpa.get("spec") or {}
    ref = spec.get("scaleTargetRef") or {}
    if ref.get("kind") != "Deployment" or not named("Deployment", ref.get("name")):
        rep.error(path, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a Deployment here")
    for dep in named("Deployment", ref.get("name")):
        if "replicas" in dep.get("spec", {}):
            rep.error(path, "the target Deployment sets replicas, which every apply would reset")
    lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if not isinstance(lo, int) or not isinstance(hi, int):
        rep.error(path, f"minReplicas {lo!r} / maxReplicas {hi!r} must be numbers")
    elif lo > hi:
        rep.error(path, "minReplicas is above maxReplicas")
    pods_metrics = [m for m in spec.get("metrics", []) if m.get("type") == "Pods"]
    if not pods_metrics:
        rep.error(path, "no Pods metric (queue time through the Prometheus adapter)")
    for m in pods_metrics:
        name = ((m.get("pods") or {}).get("metric") or {}).get("name")
        if name not in adapter_metrics:
            rep.error(path, f"Pods metric {name!r} is not produced by any prometheus-adapter rule "
                            f"(rules give: {', '.join(sorted(filter(None, adapter_metrics))) or 'none'})")
        target = (m.get("pods") or {}).get("target") or {}
        if parse_quantity(target.get("averageValue")) is None:
            rep.error(path, f"Pods metric {name}: averageValue {target.get('averageValue')!r} is not a quantity")


def check_deployment(path, dep, named, request_timeouts, rep: Report) -> None:
    spec = dep.get("spec") or {}
    tmpl = spec.get("template") or {}
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    if not labels_match(spec.get("selector"), labels):
        rep.error(path, "spec.selector does not match the pod template labels")
    pod = tmpl.get("spec") or {}
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    containers = pod.get("containers", [])
    kiln = [c for c in containers if str(c.get("image", "")).startswith("kiln:")]
    if not kiln:
        rep.error(path, "no container runs a kiln:* image")
    for c in containers:
        who = f"container {c.get('name')}"
        check_container_security(c, pod.get("securityContext"), path, who, rep)
        check_resources(c.get("resources") or {}, path, who, rep)
        port_names = {p.get("name") for p in c.get("ports", [])}
        port_numbers = {p.get("containerPort") for p in c.get("ports", [])}
        for p in c.get("ports", []):
            if len(p.get("name", "")) > 15:
                rep.error(path, f"{who}: port name {p['name']!r} is longer than 15 characters")
        if c in kiln:
            for want, number in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
                if not any(p.get("name") == want and p.get("containerPort") == number for p in c.get("ports", [])):
                    rep.error(path, f"{who}: needs port {want} = {number}")
            env = {e.get("name"): e.get("value") for e in c.get("env", [])}
            for var, number in (("KILN_HTTP_PORT", 8000), ("KILN_GRPC_PORT", 8001), ("KILN_METRICS_PORT", 8002)):
                if var in env and str(env[var]) != str(number):
                    rep.error(path, f"{who}: {var}={env[var]} but the container port is {number}")
            repo = env.get("KILN_MODEL_REPOSITORY")
            if not repo:
                rep.error(path, f"{who}: KILN_MODEL_REPOSITORY is not set")
            for probe, want_path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready")):
                pr = c.get(probe)
                if not pr:
                    rep.error(path, f"{who}: no {probe}")
                    continue
                if (pr.get("httpGet") or {}).get("path") != want_path:
                    rep.error(path, f"{who}: {probe} must GET {want_path}")
                if not probe_port_ok(pr, {"http"}, {8000}):
                    rep.error(path, f"{who}: {probe} must use the HTTP port (8000)")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                pr = c.get(probe)
                if pr and not probe_port_ok(pr, port_names, port_numbers):
                    port = (pr.get("httpGet") or {}).get("port")
                    rep.error(path, f"{who}: {probe} port {port!r} is not a container port")
            # The SIGTERM drain: preStop, then in-flight requests (each bounded by request_timeout_ms).
            grace = pod.get("terminationGracePeriodSeconds", 30)
            pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            config_mounts = [m for m in c.get("volumeMounts", []) if m.get("mountPath", "").endswith("/config.toml")]
            if not config_mounts:
                rep.error(path, f"{who}: no config.toml mounted from a ConfigMap")
            for m in config_mounts:
                if repo and not re.fullmatch(re.escape(repo.rstrip("/")) + r"/[^/]+/config\.toml", m["mountPath"]):
                    rep.error(path, f"{who}: {m['mountPath']} is not <repository>/<model>/config.toml")
                cm_name = ((volumes.get(m.get("name")) or {}).get("configMap") or {}).get("name")
                timeout = request_timeouts.get(cm_name)
                if timeout is None:
                    rep.error(path, f"{who}: {m['mountPath']}: the model config sets no request_timeout_ms, "
                                    "so the SIGTERM drain has no bound")
                elif grace < pre + timeout / 1000 + 5:
                    rep.error(path, f"terminationGracePeriodSeconds {grace} is shorter than the drain: preStop "
                                    f"{pre} s + request_timeout_ms {timeout} ms + 5 s")
        for m in c.get("volumeMounts", []):
            vol = volumes.get(m.get("name"))
            if vol is None:
                rep.error(path, f"{who}: volumeMount {m.get('name')} has no volume")
                continue
            if "configMap" in vol:
                cms = named("ConfigMap", vol["configMap"].get("name"))
                if not cms:
                    rep.error(path, f"volume {m['name']}: ConfigMap {vol['configMap'].get('name')} is not defined here")
                elif m.get("subPath") and m["subPath"] not in (cms[0].get("data") or {}):
                    rep.error(path, f"volume {m['name']}: ConfigMap has no key {m['subPath']}")
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"].get("claimName")
                if not named("PersistentVolumeClaim", claim):
                    rep.error(path, f"volume {m['name']}: PersistentVolumeClaim {claim} is not defined here")
                if not m.get("readOnly"):
                    rep.error(path, f"{who}: the model store {m['name']} must be mounted readOnly")
    used = {m.get("name") for c in containers for m in c.get("volumeMounts", [])}
    for name in volumes:
        if name not in used:
            rep.error(path, f"volume {name} is mounted by no container")


def check_adapter_config(text: str, where, cat: Catalogue, rep: Report) -> set:
    """Checks a prometheus-adapter config; returns the metric names its rules serve."""
    cfg = load_yaml_text(text, where, rep)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("rules"), list) or not cfg["rules"]:
        rep.error(where, "prometheus-adapter config.yaml: needs a non-empty `rules` list")
        return set()
    served = set()
    allowed = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
    for i, rule in enumerate(cfg["rules"]):
        what = f"prometheus-adapter rule {i}"
        if not isinstance(rule, dict):
            rep.error(where, f"{what}: not a mapping")
            continue
        for key in set(rule) - allowed:
            rep.error(where, f"{what}: unknown key {key}")
        for key in ("seriesQuery", "resources", "name", "metricsQuery"):
            if key not in rule:
                rep.error(where, f"{what}: {key} is required")
        overrides = ((rule.get("resources") or {}).get("overrides") or {})
        for label in ("namespace", "pod"):
            if (overrides.get(label) or {}).get("resource") != label:
                rep.error(where, f"{what}: resources.overrides must map label {label} to resource {label}")
        name = rule.get("name") or {}
        if not name.get("as") or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", str(name.get("as"))):
            rep.error(where, f"{what}: name.as must be a metric name")
        else:
            served.add(name["as"])
        series = check_promql(str(rule.get("seriesQuery", "")), where, f"{what} seriesQuery", cat, rep)
        if name.get("matches"):
            try:
                if not any(re.search(name["matches"], s) for s in series):
                    rep.error(where, f"{what}: name.matches {name['matches']!r} matches no series of seriesQuery")
            except re.error as e:
                rep.error(where, f"{what}: name.matches: {e}")
        query = str(rule.get("metricsQuery", ""))
        for placeholder in re.findall(r"<<\s*\.(\w+)\s*>>", query):
            if placeholder not in ("Series", "LabelMatchers", "GroupBy"):
                rep.error(where, f"{what}: metricsQuery: unknown template field .{placeholder}")
        if "<<.LabelMatchers>>" not in query.replace(" ", "") or "<<.GroupBy>>" not in query.replace(" ", ""):
            rep.error(where, f"{what}: metricsQuery must use <<.LabelMatchers>> and <<.GroupBy>> "
                             "(per-pod values for the HPA)")
        concrete = (query.replace("<<.Series>>", sorted(series)[0] if series else "x")
                    .replace("<<.LabelMatchers>>", 'namespace="kiln",pod=~"kiln-.*"')
                    .replace("<<.GroupBy>>", "pod"))
        check_promql(concrete, where, f"{what} metricsQuery", cat, rep)
        rep.counts["adapter rules"] = rep.counts.get("adapter rules", 0) + 1
    return served


# ---------------------------------------------------------------------------------------------
# KServe


def check_kserve(root: Path, rep: Report) -> None:
    kdir = root / "deploy" / "kserve"
    if not kdir.is_dir():
        rep.error(kdir, "missing")
        return
    try:
        schema_text = KSERVE_SCHEMA.read_text()
        json.loads(schema_text)
    except (OSError, json.JSONDecodeError) as e:
        rep.error(KSERVE_SCHEMA, f"cannot read: {e}")
        return

    runtimes, services = {}, []
    for path in sorted(kdir.rglob("*")):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        rep.seen(path, "kserve")
        docs = load_yaml_docs(path, rep)
        if docs is None:
            continue
        if not docs:
            rep.error(path, "no object in the file")
        for doc in docs:
            kind = doc.get("kind") if isinstance(doc, dict) else None
            kind = kind if isinstance(kind, str) else None
            if kind in KSERVE_KINDS:
                for msg in _kserve_schema_errors(schema_text, json.dumps(doc, sort_keys=True, default=str)):
                    rep.error(path, msg)
            if kind in ("ServingRuntime", "ClusterServingRuntime"):
                runtimes[(doc.get("metadata") or {}).get("name")] = (path, doc)
            elif kind == "InferenceService":
                services.append((path, doc))
            else:
                rep.error(path, f"unexpected kind {kind!r} (ServingRuntime or InferenceService)")
    rep.counts["kserve objects"] = len(runtimes) + len(services)
    if not runtimes:
        rep.error(kdir, "no ServingRuntime")
    if not services:
        rep.error(kdir, "no InferenceService")

    runtime_ports = {}
    for name, (path, rt) in runtimes.items():
        guarded(rep, path, check_runtime, name, path, rt, runtime_ports, rep)
    for path, isvc in services:
        guarded(rep, path, check_inference_service, path, isvc, runtimes, runtime_ports, rep)


def check_runtime(name, path, rt, runtime_ports, rep: Report) -> None:
    spec = rt.get("spec") or {}
    cs = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    main = [c for c in cs if c.get("name") == "kserve-container"]
    if not main:
        rep.error(path, "the model server container must be named kserve-container "
                        "(KServe mounts /mnt/models into that container)")
        return
    c = main[0]
    args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}

    def flag(name, env_name):
        for i, a in enumerate(args):
            if a.startswith(f"--{name}="):
                return a.split("=", 1)[1]
            if a == f"--{name}" and i + 1 < len(args):
                return args[i + 1]
        return env.get(env_name)

    if "serve" not in args:
        rep.error(path, "kserve-container does not run `kiln serve`")
    if flag("model-repository", "KILN_MODEL_REPOSITORY") != "/mnt/models":
        rep.error(path, "kiln serve must read the repository KServe mounts: --model-repository=/mnt/models")
    http, grpc = flag("http-port", "KILN_HTTP_PORT"), flag("grpc-port", "KILN_GRPC_PORT")
    if http != "8080":
        rep.error(path, f"--http-port is {http}: KServe sends REST to 8080")
    runtime_ports[name] = (http, grpc)
    for probe in ("readinessProbe", "livenessProbe"):
        pr = c.get(probe) or {}
        if pr and str((pr.get("httpGet") or {}).get("port")) != str(http):
            rep.error(path, f"{probe} port is not the HTTP port {http}")
    if ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path") != "/v2/health/ready":
        rep.error(path, "readinessProbe must GET /v2/health/ready")
    check_container_security(c, {}, path, "kserve-container", rep)
    check_resources(c.get("resources") or {}, path, "kserve-container", rep)
    formats = [f.get("name") for f in spec.get("supportedModelFormats") or [] if isinstance(f, dict)]
    if "onnx" not in formats:
        rep.error(path, "supportedModelFormats must include onnx")
    for want in ("v2", "grpc-v2"):
        if want not in (spec.get("protocolVersions") or []):
            rep.error(path, f"protocolVersions must include {want}")


def check_inference_service(path, isvc, runtimes, runtime_ports, rep: Report) -> None:
    model = (((isvc.get("spec") or {}).get("predictor") or {}).get("model") or {})
    rt_name = model.get("runtime")
    if rt_name not in runtimes:
        rep.error(path, f"runtime {rt_name!r} is not a ServingRuntime in deploy/kserve")
        return
    rt = runtimes[rt_name][1].get("spec") or {}
    fmt = model.get("modelFormat") or {}
    if not any(isinstance(f, dict) and f.get("name") == fmt.get("name")
               and (fmt.get("version") is None or f.get("version") == fmt.get("version"))
               for f in rt.get("supportedModelFormats") or []):
        rep.error(path, f"modelFormat {fmt} is not supported by runtime {rt_name}")
    proto = model.get("protocolVersion")
    if proto is None:
        rep.error(path, "protocolVersion is unset: KServe then asks for v1, which the runtime does not offer")
    elif proto not in (rt.get("protocolVersions") or []):
        rep.error(path, f"protocolVersion {proto} is not offered by runtime {rt_name}")
    if proto == "grpc-v2":
        grpc = runtime_ports.get(rt_name, (None, None))[1]
        if not any(p.get("name") == "h2c" and str(p.get("containerPort")) == str(grpc)
                   for p in model.get("ports") or []):
            rep.error(path, f"grpc-v2 needs ports: [{{name: h2c, containerPort: {grpc}}}] (the runtime's --grpc-port)")


KSERVE_KINDS = {"ServingRuntime": "ServingRuntime", "ClusterServingRuntime": "ServingRuntime",
                "InferenceService": "InferenceService"}


@functools.lru_cache(maxsize=None)
def _kserve_validator(schema_text: str, version: str, kind: str):
    schema = json.loads(schema_text)
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = referencing.Registry().with_resource(K8S_DEFINITIONS_ID, referencing.Resource.from_contents(defs))
    sub = {k: v for k, v in schema.items() if k != "oneOf"}
    sub["$ref"] = f"#/$defs/{KSERVE_KINDS[kind]}"
    return jsonschema.Draft202012Validator(sub, registry=registry)


@functools.lru_cache(maxsize=None)
def _kserve_schema_errors(schema_text: str, doc_json: str) -> tuple:
    doc = json.loads(doc_json)
    kind = doc["kind"]
    out = []
    for version in K8S_VERSIONS:
        validator = _kserve_validator(schema_text, version, kind)
        errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
        for leaf in _deepest(errors):
            where = ".".join(str(p) for p in leaf.absolute_path) or "(top)"
            out.append(f"{kind}: KServe schema (Kubernetes {version} types): {where}: {leaf.message}")
    return tuple(out)


def _deepest(errors):
    out = []
    for e in errors:
        if e.context:
            out.extend(_deepest(e.context))
        else:
            out.append(e)
    # Keep the messages short: the same place reported once.
    seen, uniq = set(), []
    for e in out:
        key = (tuple(e.absolute_path), e.message)
        if key not in seen:
            seen.add(key)
            uniq.append(e)
    return uniq[:5]


# ---------------------------------------------------------------------------------------------
# Compose, Prometheus, Grafana


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def expand_default(value: str) -> str:
    """`${VAR:-default}` -> default (what an empty environment gives)."""
    return ENV_REF.sub(lambda m: m.group(2) or "", str(value))


def parse_port(spec) -> tuple | None:
    """'[ip:]host:container[/proto]' -> (host_ip, host_port, container_port)."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), spec.get("published"), spec.get("target")
    m = re.fullmatch(r"(?:(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):)?(?:(\d+):)?(\d+)(?:/(tcp|udp))?", str(spec))
    if not m:
        return None
    return m.group(1), int(m.group(2)) if m.group(2) else None, int(m.group(3))


def check_compose(root: Path, structs: dict, cat: Catalogue, rep: Report, compose_bin: str | None) -> None:
    cdir = root / "deploy" / "compose"
    base_path = cdir / "compose.yaml"
    gpu_path = cdir / "compose.gpu.yaml"
    for p in (base_path, gpu_path):
        if not p.is_file():
            rep.error(p, "missing")
    if not base_path.is_file():
        return
    base = (load_yaml_docs(base_path, rep) or [None])[0]
    gpu = (load_yaml_docs(gpu_path, rep) or [None])[0] if gpu_path.is_file() else None
    rep.seen(base_path, "compose")
    if gpu_path.is_file():
        rep.seen(gpu_path, "compose")
    if not isinstance(base, dict):
        rep.error(base_path, "not a compose file")
        return

    # The compose CLI's own validation (the compose-spec schema, interpolation, merging).
    if compose_bin:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "COMPOSE_", "GRAFANA_"))}
        for files in ([base_path], [base_path, gpu_path]):
            if not all(f.is_file() for f in files):
                continue
            cmd = [compose_bin, "--project-directory", str(cdir)]
            for f in files:
                cmd += ["-f", str(f)]
            run = run_tool(cmd + ["config", "--quiet"], list(cdir.rglob("*")), env)
            if run.returncode != 0:
                rep.error(files[-1], f"docker compose config failed: {run.stderr.strip() or run.stdout.strip()}")
            else:
                rep.counts["compose configs"] = rep.counts.get("compose configs", 0) + 1
    else:
        rep.error(base_path, "no docker compose CLI to validate with")

    top_allowed = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
    for doc, path in ((base, base_path), (gpu, gpu_path)):
        if isinstance(doc, dict):
            for key in doc:
                if key not in top_allowed and not str(key).startswith("x-"):
                    rep.error(path, f"unknown top-level key {key}")
    services = base.get("services") or {}
    for want in ("kiln", "prometheus", "grafana"):
        if want not in services:
            rep.error(base_path, f"no service {want}")
    named_volumes = set((base.get("volumes") or {}).keys())

    bind_targets = {}  # (service, target) -> host path
    for doc, path in ((base, base_path), (gpu, gpu_path)):
        for sname, svc in ((doc or {}).get("services") or {}).items():
            if not isinstance(svc, dict):
                rep.error(path, f"service {sname}: not a mapping")
                continue
            for vol in svc.get("volumes") or []:
                if isinstance(vol, str):
                    parts = vol.split(":")
                    src, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
                    kind = "bind" if src.startswith((".", "/", "$")) else "volume"
                    read_only = len(parts) > 2 and "ro" in parts[2].split(",")
                else:
                    src, target = vol.get("source"), vol.get("target")
                    kind, read_only = vol.get("type"), vol.get("read_only", False)
                if kind == "bind":
                    host = (path.parent / expand_default(src)).resolve()
                    if not host.exists():
                        rep.error(path, f"service {sname}: bind-mount source {src} does not exist ({host})")
                    if not read_only:
                        rep.error(path, f"service {sname}: bind mount {target} should be read-only")
                    bind_targets[(sname, target)] = host
                elif kind == "volume" and src not in named_volumes:
                    rep.error(path, f"service {sname}: volume {src} is not declared under volumes:")

    kiln = services.get("kiln") or {}
    if kiln.get("image") != "kiln:cpu":
        rep.error(base_path, "service kiln must use image kiln:cpu")
    env = kiln.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    repo = env.get("KILN_MODEL_REPOSITORY")
    if ("kiln", repo) not in bind_targets:
        rep.error(base_path, f"KILN_MODEL_REPOSITORY={repo} is not a bind-mounted model repository")
    else:
        host = bind_targets[("kiln", repo)]
        if host.is_dir() and not any(host.glob("*/[0-9]*/*.onnx")):
            rep.error(base_path, f"the bind-mounted repository {host} holds no <model>/<version>/*.onnx")
    ports = [parse_port(p) for p in kiln.get("ports") or []]
    if None in ports:
        rep.error(base_path, "service kiln: a port mapping does not parse")
    published = {p[2] for p in ports if p}
    http_port = int(env.get("KILN_HTTP_PORT", 8000))
    metrics_port = int(env.get("KILN_METRICS_PORT", 8002))
    for want in (http_port, int(env.get("KILN_GRPC_PORT", 8001)), metrics_port):
        if want not in published:
            rep.error(base_path, f"service kiln: container port {want} is not published")
    hc = kiln.get("healthcheck") or {}
    test = hc.get("test") or []
    if not (isinstance(test, list) and test[:1] == ["CMD"] and "/usr/local/bin/kiln" in test and "health" in test):
        rep.error(base_path, "service kiln: healthcheck must run [CMD, /usr/local/bin/kiln, health, ...]")
    else:
        urls = [test[i + 1] for i, a in enumerate(test[:-1]) if a == "--url"]
        if urls and not re.fullmatch(rf"http://127\.0\.0\.1:{http_port}/v2/health/ready", urls[0]):
            rep.error(base_path, f"service kiln: healthcheck URL {urls[0]} is not the readiness endpoint "
                                 f"on {http_port}")
    for key in ("interval", "timeout", "retries", "start_period"):
        if key not in hc:
            rep.error(base_path, f"service kiln: healthcheck.{key} is not set")
    if not kiln.get("read_only"):
        rep.error(base_path, "service kiln: read_only should be true")
    if not kiln.get("user") or str(kiln.get("user")).split(":")[0] in ("0", "root"):
        rep.error(base_path, "service kiln: user must be a non-root user")

    # The GPU override.
    if isinstance(gpu, dict):
        gk = (gpu.get("services") or {}).get("kiln") or {}
        if gk.get("image") != "kiln:cuda":
            rep.error(gpu_path, "service kiln must use image kiln:cuda")
        devices = ((((gk.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or [])
        if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
            rep.error(gpu_path, "deploy.resources.reservations.devices needs {driver: nvidia, capabilities: [gpu]}")
        for (sname, target), host in bind_targets.items():
            if sname == "kiln" and target.endswith("/config.toml") and host.is_file():
                cfg = check_model_config(host.read_text(), host, structs, rep)
                rep.seen(host, "config.toml")
                if cfg and (cfg.get("instance_group") or {}).get("device", "cpu") == "cpu":
                    rep.error(host, "mounted by the GPU variant but instance_group.device is cpu")

    # Prometheus: the config it mounts scrapes kiln's metrics port.
    prom_cfg = next((h for (s, t), h in bind_targets.items() if s == "prometheus" and t.endswith(".yml")), None)
    if prom_cfg is None or not prom_cfg.is_file():
        rep.error(base_path, "service prometheus mounts no prometheus.yml")
    else:
        rep.seen(prom_cfg, "prometheus")
        cfg = (load_yaml_docs(prom_cfg, rep) or [None])[0] or {}
        targets = [t for sc in cfg.get("scrape_configs") or [] for st in sc.get("static_configs") or []
                   for t in st.get("targets") or []]
        if f"kiln:{metrics_port}" not in targets:
            rep.error(prom_cfg, f"no scrape target kiln:{metrics_port} (the kiln service's metrics port)")
        for sc in cfg.get("scrape_configs") or []:
            targets_here = [t for st in sc.get("static_configs") or [] for t in st.get("targets") or []]
            if any(str(t).startswith("kiln:") for t in targets_here):
                if sc.get("metrics_path", "/metrics") != "/metrics":
                    rep.error(prom_cfg, "the kiln job must scrape /metrics")

    # Grafana: provisioning and dashboards.
    prov = bind_targets.get(("grafana", "/etc/grafana/provisioning"))
    dash_dirs = {t: h for (s, t), h in bind_targets.items() if s == "grafana" and t != "/etc/grafana/provisioning"}
    if prov is None or not prov.is_dir():
        rep.error(base_path, "service grafana mounts no provisioning folder at /etc/grafana/provisioning")
        return
    uids = set()
    for f in sorted((prov / "datasources").glob("*.y*ml")):
        rep.seen(f, "grafana")
        doc = (load_yaml_docs(f, rep) or [None])[0] or {}
        if doc.get("apiVersion") != 1:
            rep.error(f, "apiVersion must be 1")
        for ds in doc.get("datasources") or []:
            if ds.get("type") == "prometheus":
                uids.add(ds.get("uid"))
                if ds.get("url") != "http://prometheus:9090":
                    rep.error(f, f"datasource URL {ds.get('url')} is not the compose prometheus service")
    if not uids:
        rep.error(prov / "datasources", "no Prometheus datasource with a uid")
    dashboards = []
    for f in sorted((prov / "dashboards").glob("*.y*ml")):
        rep.seen(f, "grafana")
        doc = (load_yaml_docs(f, rep) or [None])[0] or {}
        if doc.get("apiVersion") != 1:
            rep.error(f, "apiVersion must be 1")
        for provider in doc.get("providers") or []:
            path = (provider.get("options") or {}).get("path")
            if path not in dash_dirs:
                rep.error(f, f"provider {provider.get('name')}: {path} is not a folder mounted into grafana")
                continue
            found = sorted(dash_dirs[path].glob("*.json"))
            if not found:
                rep.error(f, f"provider {provider.get('name')}: no dashboard JSON in {dash_dirs[path]}")
            dashboards += found
    if not dashboards:
        rep.error(prov / "dashboards", "no dashboard provisioned")
    for f in dashboards:
        guarded(rep, f, check_dashboard, f, uids, cat, rep)


def check_dashboard(path: Path, uids: set, cat: Catalogue, rep: Report) -> None:
    rep.seen(path, "dashboards")
    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        rep.error(path, f"JSON: {e}")
        return
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            rep.error(path, f"dashboard has no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    builtins = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    for name, v in variables.items():
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", str(q or ""))
        if v.get("type") == "query":
            if not m:
                rep.error(path, f"variable {name}: expected label_values(<selector>, <label>)")
            else:
                check_promql(m.group(1), path, f"variable {name}", cat, rep)
                if m.group(2) not in cat.labels:
                    rep.error(path, f"variable {name}: label {m.group(2)} is not one Kiln exports")
    ids, queries = set(), 0

    def panels(items):
        for p in items or []:
            yield p
            yield from panels(p.get("panels"))

    for p in panels(dash.get("panels")):
        pid = p.get("id")
        if pid in ids:
            rep.error(path, f"panel id {pid} is used twice")
        ids.add(pid)
        if p.get("type") == "row":
            continue
        what = f"panel {pid} {p.get('title')!r}"
        for ds in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]:
            if not isinstance(ds, dict) or ds.get("uid") not in uids:
                rep.error(path, f"{what}: datasource {ds} is not the provisioned Prometheus "
                                f"({', '.join(map(str, uids))})")
        if not p.get("targets"):
            rep.error(path, f"{what}: no query")
        for t in p.get("targets") or []:
            expr = str(t.get("expr", ""))

            def subst(m):
                name = m.group(1) or m.group(2)
                if name in builtins:
                    return builtins[name]
                if name in variables:
                    return ".*"
                rep.error(path, f"{what}: ${name} is not a dashboard variable")
                return ".*"

            concrete = re.sub(r"\$\{(\w+)\}|\$(\w+)", subst, expr)
            check_promql(concrete, path, what, cat, rep)
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", str(t.get("legendFormat", ""))):
                if label not in cat.labels:
                    rep.error(path, f"{what}: legend label {label} is not one Kiln exports")
            queries += 1
    rep.counts["dashboard queries"] = rep.counts.get("dashboard queries", 0) + queries


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def check_dockerfiles(root: Path, rep: Report, hadolint: str | None) -> None:
    files = sorted(p for p in (root / "deploy").rglob("Dockerfile*") if p.is_file())
    if not files:
        rep.error(root / "deploy", "no Dockerfile under deploy/ (deploy/**/Dockerfile*) to lint")
        return
    if not hadolint:
        rep.error(root / "deploy", "hadolint not found")
        return
    for f in files:
        rep.seen(f, "dockerfiles")
        run = run_tool([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(f)], [f, HADOLINT_CONFIG])
        if run.returncode != 0:
            out = (run.stdout + run.stderr).strip().replace(str(f), rep.rel(f))
            rep.error(f, f"hadolint:\n{out}")


# ---------------------------------------------------------------------------------------------


def validate_tree(root: Path, tools: dict) -> Report:
    rep = Report(root=root)
    cat = metric_catalogue(root, rep)
    structs = config_fields(root, rep)
    deploy = root / "deploy"
    guarded(rep, deploy / "kubernetes", check_kubernetes, root, structs, cat, rep, tools.get("kubectl"))
    guarded(rep, deploy / "kserve", check_kserve, root, rep)
    guarded(rep, deploy / "compose" / "compose.yaml", check_compose, root, structs, cat, rep, tools.get("compose"))
    guarded(rep, deploy, check_dockerfiles, root, rep, tools.get("hadolint"))
    for path in sorted((root / "deploy").rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".toml") and rep.rel(path) not in rep.checked:
            rep.error(path, "no check reads this file: validate it in tests/deploy/validate_deploy.py")
    return rep


# ---------------------------------------------------------------------------------------------
# Self-check: each break below must be reported against the file it breaks.

GOOD_DOCKERFILE = """\
FROM debian:bookworm-slim
WORKDIR /app
COPY kiln /usr/local/bin/kiln
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kiln"]
"""
BAD_DOCKERFILE = """\
FROM debian:latest
WORKDIR app
RUN apt-get update && apt-get install curl
"""


def _replace(old, new, count=1):
    def mutate(text):
        if old not in text:
            raise RuntimeError(f"self-check: {old!r} not found: the mutation is stale")
        return text.replace(old, new, count)
    return mutate


MUTATIONS = [
    # (what, file, mutation)
    ("wrong field type (containerPort as text)", "deploy/kubernetes/deployment.yaml",
     _replace("containerPort: 8000", 'containerPort: "eight thousand"')),
    ("unknown field (strict schema)", "deploy/kubernetes/hpa.yaml",
     _replace("minReplicas:", "minReplica:")),
    ("unknown kind", "deploy/kubernetes/pdb.yaml",
     _replace("kind: PodDisruptionBudget", "kind: PodDisruptionBudgte")),
    ("duplicate YAML key", "deploy/kubernetes/service.yaml",
     _replace("  type: ClusterIP", "  type: ClusterIP\n  type: NodePort")),
    ("Service targetPort naming no container port", "deploy/kubernetes/service.yaml",
     _replace("targetPort: grpc", "targetPort: grcp")),
    ("grace period shorter than the drain", "deploy/kubernetes/deployment.yaml",
     _replace("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 5")),
    ("unknown config.toml key", "deploy/kubernetes/configmap-model-mlp.yaml",
     _replace("max_batch_size = 16", "max_batch_sise = 16")),
    ("HPA metric no adapter rule produces", "deploy/kubernetes/hpa.yaml",
     _replace("name: kiln_queue_duration_us_per_request", "name: kiln_queue_time")),
    ("adapter query on an undefined metric", "deploy/kubernetes/prometheus-adapter/config.yaml",
     _replace("rate(nv_inference_request_success{", "rate(nv_inference_request_succes{")),
    ("KServe protocol version outside the enum", "deploy/kserve/servingruntime.yaml",
     _replace("    - grpc-v2", "    - grpc-v3")),
    ("KServe container field of the wrong type", "deploy/kserve/servingruntime.yaml",
     _replace("runAsNonRoot: true", 'runAsNonRoot: "yes"')),
    ("InferenceService without storageUri", "deploy/kserve/inferenceservice.yaml",
     _replace("      storageUri: s3://kiln-models/repository\n", "")),
    ("InferenceService without protocolVersion", "deploy/kserve/inferenceservice.yaml",
     _replace("      protocolVersion: v2\n", "")),
    ("compose port that does not parse", "deploy/compose/compose.yaml",
     _replace('"127.0.0.1:8001:8001"', '"127.0.0.1:8001:grpc"')),
    ("compose bind mount of a missing file", "deploy/compose/compose.yaml",
     _replace("./prometheus/prometheus.yml", "./prometheus/missing.yml")),
    ("compose healthcheck removed", "deploy/compose/compose.yaml",
     lambda t: re.sub(r"    healthcheck:\n(      .*\n)+", "", t, count=1)),
    ("GPU override without the device reservation", "deploy/compose/compose.gpu.yaml",
     _replace("driver: nvidia", "driver: nvidai")),
    ("dashboard query on an undefined metric", "deploy/compose/grafana/dashboards/kiln.json",
     _replace("nv_inference_request_success{", "nv_inference_request_sucess{")),
    ("dashboard query that does not parse", "deploy/compose/grafana/dashboards/kiln.json",
     _replace("sum by (model) (nv_inference_pending_request_count",
              "sum by (model) ((nv_inference_pending_request_count")),
    ("Dockerfile hadolint rejects", "deploy/docker/Dockerfile.selfcheck", lambda _t: BAD_DOCKERFILE),
]


def self_check(root: Path, tools: dict) -> tuple[int, list]:
    """Returns (caught, failures)."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="kiln-deploy-selfcheck-") as tmp:
        base = Path(tmp) / "tree"
        base.mkdir()
        shutil.copytree(root / "deploy", base / "deploy", symlinks=True)
        # The rest of the tree is only read: link it.
        for top in ("crates", "models"):
            (base / top).symlink_to(root / top)
        # A known-good Dockerfile, so that the lint itself is shown to pass one.
        (base / "deploy" / "docker").mkdir(exist_ok=True)
        (base / "deploy" / "docker" / "Dockerfile.known-good").write_text(GOOD_DOCKERFILE)
        baseline = {(f, m) for f, m in validate_tree(base, tools).errors}
        if any(f == "deploy/docker/Dockerfile.known-good" for f, _ in baseline):
            failures.append("hadolint rejects the known-good Dockerfile: "
                            + "; ".join(m for f, m in baseline if f.endswith("Dockerfile.known-good")))
        caught = 0
        for what, rel, mutate in MUTATIONS:
            target = base / rel
            original = target.read_text() if target.exists() else None
            try:
                target.write_text(mutate(original or ""))
            except RuntimeError as e:
                failures.append(str(e))
                continue
            try:
                errors = {(f, m) for f, m in validate_tree(base, tools).errors} - baseline
            finally:
                if original is None:
                    target.unlink()
                else:
                    target.write_text(original)
            if any(f == rel for f, _ in errors):
                caught += 1
            else:
                failures.append(f"not caught: {what} in {rel}"
                                + (f" (reported elsewhere: {sorted(errors)[:2]})" if errors else ""))
    return caught, failures


# ---------------------------------------------------------------------------------------------


def find_tool(name: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=HERE.parent.parent, help="the source tree (default: this one)")
    ap.add_argument("--self-check", action="store_true",
                    help="also break a copy of deploy/ and require each break to be caught")
    ap.add_argument("--hadolint", help="hadolint binary (default: next to this python, then PATH)")
    ap.add_argument("--compose", help="docker compose v2 CLI (default: docker-compose next to this python, then PATH)")
    ap.add_argument("--kubectl", help="kubectl, for `kubectl kustomize` (default: PATH; optional)")
    args = ap.parse_args()
    root = args.root.resolve()
    tools = {
        "hadolint": find_tool("hadolint", args.hadolint),
        "compose": find_tool("docker-compose", args.compose),
        "kubectl": args.kubectl or shutil.which("kubectl"),
    }
    started = time.monotonic()
    rep = validate_tree(root, tools)
    for f, m in rep.errors:
        print(f"FAIL {f}: {m}")
    for n in rep.notes:
        print(f"note: {n}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.counts.items()))
    print(f"checked {len(rep.checked)} files ({counts}) against Kubernetes {' and '.join(K8S_VERSIONS)}")
    ok = not rep.errors
    selfcheck = ""
    if args.self_check:
        caught, failures = self_check(root, tools)
        for f in failures:
            print(f"SELF-CHECK FAIL {f}")
        selfcheck = f", self-check {caught}/{len(MUTATIONS)} breaks caught"
        ok = ok and not failures
    print(f"deploy validation: {'PASS' if ok else 'FAIL'}: {len(rep.checked)} files, {len(rep.errors)} errors"
          f"{selfcheck} ({time.monotonic() - started:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
