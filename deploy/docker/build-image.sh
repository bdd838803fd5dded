#!/usr/bin/env bash
# Builds the kiln container image without pulling anything from a registry: the root filesystem is
# assembled here from the `kiln` binary and the shared libraries it links, then `docker build` puts
# it into a FROM-scratch image (deploy/docker/Dockerfile, or Dockerfile.cuda with --cuda).
#
#   deploy/docker/build-image.sh [--binary PATH] [--tag TAG] [--cuda] [--no-strip]
#
#   --binary PATH  the kiln binary to package. Default (CPU): ${CARGO_TARGET_DIR:-target}/release/kiln,
#                  built with `cargo build --release -p kiln-cli` when missing. Default (--cuda):
#                  ${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}/release/kiln, built as
#                  scripts/cuda/build.sh builds it when missing.
#   --tag TAG      image name (default kiln:cpu, with --cuda kiln:cuda).
#   --cuda         package a `cuda`-feature binary: the CUDA runtime libraries it links (from the pip
#                  wheels of scripts/cuda/setup.sh) go to /usr/local/cuda/lib64 in the image; the
#                  driver's libcuda.so.1 and libnvidia-ml.so.1 are left out (the NVIDIA Container
#                  Toolkit mounts them at `docker run --gpus ...`).
#   --no-strip     package the binary as it is (default: a copy without debug info, `strip --strip-debug`;
#                  symbols stay, so backtraces keep function names).
#
# The root filesystem: /usr/local/bin/kiln; every library `ldd` lists, at the path it lists, with the
# dynamic loader; /etc/passwd and /etc/group with root and the user kiln (65532:65532);
# /etc/nsswitch.conf; an empty /models (the model repository mount point); /tmp (1777). Before
# `docker build`, `kiln --version` runs chrooted in it (as root), so a missing library fails here.
# Prints the image name and size as the last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/docker"

binary=""
tag=""
cuda=0
strip_debug=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --binary=*) binary="${1#*=}"; shift ;;
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    --tag=*) tag="${1#*=}"; shift ;;
    --cuda) cuda=1; shift ;;
    --no-strip) strip_debug=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# cargo resolves a relative CARGO_TARGET_DIR against its working directory: pin it to this one.
if [[ -n "${CARGO_TARGET_DIR:-}" && "$CARGO_TARGET_DIR" != /* ]]; then
  export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker is not installed"
command -v ldd >/dev/null 2>&1 || die "ldd is not installed (package libc-bin)"

# The CUDA toolchain's environment (CUDA_ROOT etc.) for --cuda: its lib/ holds the runtime libraries.
cuda_lib=""
cuda_nogpu=""
if [[ $cuda == 1 ]]; then
  dockerfile="$HERE/Dockerfile.cuda"
  tag="${tag:-kiln:cuda}"
  if [[ -z "$binary" ]]; then
    binary="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}/release/kiln"
    if [[ ! -x "$binary" ]]; then
      log "no $binary: building it (cargo build --release --features cuda, the CUDA 13.0 pip toolchain)"
      eval "$(bash "$ROOT/scripts/cuda/setup.sh")"
      (cd "$ROOT" && CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}" \
        cargo build --release --features cuda)
    fi
  fi
  eval "$(bash "$ROOT/scripts/cuda/setup.sh" --env)"
  cuda_lib="$CUDA_ROOT/lib"
  cuda_nogpu="${KILN_CUDA_PREFIX:-/opt/cuda-pip}/nogpu-lib"
  [[ -d "$cuda_lib" ]] || die "no CUDA libraries at $cuda_lib: run scripts/cuda/setup.sh first"
else
  dockerfile="$HERE/Dockerfile"
  tag="${tag:-kiln:cpu}"
  if [[ -z "$binary" ]]; then
    binary="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"
    if [[ ! -x "$binary" ]]; then
      log "no $binary: building it (cargo build --release -p kiln-cli)"
      (cd "$ROOT" && cargo build --release -p kiln-cli)
    fi
  fi
fi
[[ -f "$binary" && -x "$binary" ]] || die "$binary is not an executable file"
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"

work="$(mktemp -d "${TMPDIR:-/tmp}/kiln-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/models" "$rootfs/tmp"
chmod 0755 "$rootfs" "$rootfs/usr" "$rootfs/usr/local" "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/models"
chmod 1777 "$rootfs/tmp"

if [[ $strip_debug == 1 ]] && command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$rootfs/usr/local/bin/kiln" "$binary"
else
  [[ $strip_debug == 1 ]] && log "strip not found: packaging the binary with its debug info"
  cp "$binary" "$rootfs/usr/local/bin/kiln"
fi
chmod 0755 "$rootfs/usr/local/bin/kiln"

# Libraries that come from the NVIDIA driver on the host, never from the image.
is_driver_lib() { [[ "$1" == libcuda.so* || "$1" == libnvidia-ml.so* ]]; }

# Copies one library (symlinks resolved) to `dest` inside the rootfs.
put_lib() {
  local src="$1" dest="$2"
  mkdir -p "$rootfs$(dirname "$dest")"
  cp -L "$src" "$rootfs$dest"
  chmod 0755 "$rootfs$dest"
  log "  $dest ($(du -h "$rootfs$dest" | cut -f1))"
}

# ldd's lines: "libX.so.N => /path/libX.so.N (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)" (the
# loader), "linux-vdso.so.1 (0x...)" (the kernel's, no file), "libX.so.N => not found".
ldd_env=()
[[ $cuda == 1 ]] && ldd_env=(env "LD_LIBRARY_PATH=$cuda_lib:$cuda_nogpu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
if ! ldd_out="$("${ldd_env[@]}" ldd "$binary" 2>&1)"; then
  if grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out"; then
    ldd_out=""
    log "$binary is statically linked: no libraries to copy"
  else
    die "ldd $binary failed: $ldd_out"
  fi
fi
log "libraries of $binary:"
missing=()
cuda_libs=0
while read -r line; do
  [[ -z "$line" ]] && continue
  if [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+=\>[[:space:]]+not[[:space:]]found ]]; then
    name="${BASH_REMATCH[1]}"
    is_driver_lib "$name" || missing+=("$name")
  elif [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]]; then
    name="${BASH_REMATCH[1]}" path="${BASH_REMATCH[2]}"
    is_driver_lib "$name" && continue
    if [[ -n "$cuda_lib" && "$path" == "$cuda_lib"/* ]]; then
      put_lib "$path" "/usr/local/cuda/lib64/$name"
      cuda_libs=$((cuda_libs + 1))
    else
      put_lib "$path" "$path"
    fi
  elif [[ "$line" =~ ^(/[^[:space:]]+)[[:space:]]+\(0x ]]; then
    put_lib "${BASH_REMATCH[1]}" "${BASH_REMATCH[1]}"
  elif [[ "$line" =~ ^linux-vdso|^linux-gate ]]; then
    continue
  else
    die "cannot read this ldd line: $line"
  fi
done <<<"$ldd_out"
[[ ${#missing[@]} -eq 0 ]] || die "libraries not found: ${missing[*]}"

if [[ $cuda == 1 ]]; then
  [[ $cuda_libs -gt 0 ]] || die "$binary links no CUDA library from $cuda_lib: is it a --features cuda build?"
  # NVRTC loads its builtins library at run time (no NEEDED entry): bring it along.
  if [[ -e "$rootfs/usr/local/cuda/lib64/libnvrtc.so.13" ]]; then
    for f in "$cuda_lib"/libnvrtc-builtins.so*; do
      [[ -e "$f" ]] && put_lib "$f" "/usr/local/cuda/lib64/$(basename "$f")"
    done
  fi
  # The toolkit's ldconfig run (after mounting the driver's libraries) indexes these directories.
  mkdir -p "$rootfs/etc/ld.so.conf.d"
  printf 'include /etc/ld.so.conf.d/*.conf\n' >"$rootfs/etc/ld.so.conf"
  printf '/usr/local/cuda/lib64\n' >"$rootfs/etc/ld.so.conf.d/cuda.conf"
fi

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
kiln:x:65532:65532:kiln:/nonexistent:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
kiln:x:65532:
EOF
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"

# The binary must start from this root filesystem alone.
if [[ $(id -u) == 0 ]] && command -v chroot >/dev/null 2>&1; then
  smoke_env=()
  if [[ $cuda == 1 ]]; then
    # The stub libcuda.so.1 (CUDA_ERROR_NO_DEVICE everywhere) stands in for the driver, only for this run.
    mkdir -p "$rootfs/tmp/nogpu"
    cp -L "$cuda_nogpu/libcuda.so.1" "$rootfs/tmp/nogpu/"
    smoke_env=(env LD_LIBRARY_PATH=/usr/local/cuda/lib64:/tmp/nogpu)
  fi
  if ! version="$("${smoke_env[@]}" chroot "$rootfs" /usr/local/bin/kiln --version 2>&1)"; then
    die "kiln does not start in the assembled root filesystem: $version"
  fi
  rm -rf "$rootfs/tmp/nogpu"
  log "chroot check: $version"
else
  log "not root: skipping the chroot check of the root filesystem"
fi

version="$("${ldd_env[@]}" "$binary" --version 2>/dev/null | head -n 1 | awk '{print $2}')" || true
revision="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [[ $revision != unknown && -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  revision="$revision-dirty"
fi

# The CLI's default builder may be BuildKit through the buildx plugin; without the plugin, use the
# classic builder (a FROM-scratch COPY needs nothing else).
if [[ -z "${DOCKER_BUILDKIT:-}" ]] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
log "docker build -t $tag ($(du -sh "$rootfs" | cut -f1) root filesystem)"
docker build --quiet -f "$dockerfile" -t "$tag" \
  --build-arg "VERSION=${version:-unknown}" \
  --build-arg "REVISION=$revision" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$work" >&2

size="$(docker image inspect -f '{{.Size}}' "$tag")"
printf '%s %s MB\n' "$tag" "$((size / 1000000))"
