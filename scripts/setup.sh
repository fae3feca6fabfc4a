#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, then builds it.
# Idempotent and quiet when nothing is missing:
#   1. Debian packages: C/C++ toolchain, libclang (bindgen), OpenMPI, fortunes-zh
#   2. .venv with torch==2.11.0 from the package index (the libtorch tch 0.24 binds)
#   3. LIBTORCH_USE_PYTORCH=1 cargo build --release
#   4. the default corpus glm_pretrain/data/data.json (from fortunes-zh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "setup: $*" >&2; }
TORCH_VERSION=2.11.0
VENV="$ROOT/.venv"

# 1. Debian packages (only those missing)
missing=()
for pkg in pkg-config libclang-dev openmpi-bin libopenmpi-dev fortunes-zh; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v c++ >/dev/null && command -v make >/dev/null || missing+=(build-essential)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { say "error: cargo not found; install a Rust toolchain (rustup) first"; exit 1; }

# 2. torch==2.11.0 in the project's venv
torch_ok() {
  local f
  for f in "$VENV"/lib/python3*/site-packages/torch/version.py; do
    [ -f "$f" ] && grep -q "^__version__ = '$TORCH_VERSION" "$f" && return 0
  done
  return 1
}
if ! torch_ok; then
  say "installing torch==$TORCH_VERSION into .venv (provides libtorch; a large download)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  torch_ok || { say "error: torch $TORCH_VERSION did not install into $VENV"; exit 1; }
fi

# 3. build (torch-sys asks the venv's python where libtorch is)
export LIBTORCH_USE_PYTORCH=1 PATH="$VENV/bin:$PATH"
cargo build --release --workspace --quiet

# 4. default corpus
if [ ! -s glm_pretrain/data/data.json ]; then
  say "building the default corpus glm_pretrain/data/data.json from fortunes-zh"
  target/release/glm-worker make-corpus --out glm_pretrain/data/data.json >&2
fi
