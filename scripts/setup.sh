#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, then builds it.
# Idempotent and quiet when nothing is missing:
#   1. Debian packages: C/C++ toolchain, libclang (bindgen), OpenSSL headers
#      (glm-launch's SSH client), OpenMPI, fortunes-zh; with --test also what
#      the tests run for real: OpenSSH server, iproute2, Slurm and munge
#   2. a torch 2.11.0 (the libtorch tch 0.24 binds), the first found of:
#      LIBTORCH (a libtorch or torch package directory, as torch-sys reads it),
#      the project's .venv, python3's own torch; else torch==2.11.0 from the
#      package index into .venv. It says which, and writes the choice to
#      target/torch.env, which the other scripts source.
#   3. LIBTORCH=<that directory> cargo build --release
#   4. the default corpus glm_pretrain/data/data.json (from fortunes-zh)
#   5. with --test: the Python references in .venv (tensorboard's reader too): the tokenizers
#      (sentencepiece, tokenizers), which tests/tokenizers.rs compares ids
#      with, and numpy, whose shuffle tests/split.rs compares the split with
#   6. with --test: PyTorch in .venv when its python has none (torch is
#      installed there in step 2 unless another torch was found):
#      tests/deepspeed.rs writes and reads the original's checkpoints with it
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "setup: $*" >&2; }
TORCH_VERSION=2.11.0
VENV="$ROOT/.venv"
TEST_PACKAGES=()
[ "${1:-}" = --test ] && TEST_PACKAGES=(openssh-server openssh-client iproute2 slurm-wlm munge)

# 1. Debian packages (only those missing)
missing=()
for pkg in pkg-config libclang-dev libssl-dev openmpi-bin libopenmpi-dev fortunes-zh "${TEST_PACKAGES[@]}"; do
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
# scripts/test.sh checks formatting and lints
if [ "${1:-}" = --test ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  say "installing the rustfmt and clippy components (rustup)"
  rustup component add rustfmt clippy >&2 || say "warning: could not install rustfmt/clippy (no rustup?); scripts/test.sh will report those checks as failed"
fi

# 2. a torch 2.11.0 (scripts/find_torch.sh)
source "$ROOT/scripts/find_torch.sh"
if find_torch; then :
elif [ $? = 2 ]; then exit 1
else
  say "no torch $TORCH_VERSION found (LIBTORCH, .venv, python3): installing torch==$TORCH_VERSION into .venv (provides libtorch; a large download)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  d="$(venv_torch)"
  [ -n "$d" ] && usable "$d" || { say "error: torch $TORCH_VERSION did not install into $VENV"; exit 1; }
  TORCH_DIR="$d" TORCH_PYTHON="$VENV/bin/python" TORCH_FROM="the project's .venv ($d, just installed)"
fi
mkdir -p target
env_file="target/torch.env"
new_env="# written by scripts/setup.sh: the torch $TORCH_VERSION this build uses ($TORCH_FROM)
export LIBTORCH='$TORCH_DIR'
export TORCH_PYTHON='$TORCH_PYTHON'"
say "torch $TORCH_VERSION from $TORCH_FROM"
[ -f "$env_file" ] && [ "$(cat "$env_file")" = "$new_env" ] || printf '%s\n' "$new_env" > "$env_file"

# 3. build against it (torch-sys reads LIBTORCH)
unset LIBTORCH_USE_PYTORCH
export LIBTORCH="$TORCH_DIR"
cargo build --release --workspace --quiet

# 4. default corpus
if [ ! -s glm_pretrain/data/data.json ]; then
  say "building the default corpus glm_pretrain/data/data.json from fortunes-zh"
  target/release/glm-worker make-corpus --out glm_pretrain/data/data.json >&2
fi

# 5. the references the tests compare with (pinned): the tokenizers (their ids are the
#    reference), numpy (the original's split shuffle is its legacy RandomState) and
#    tensorboard (its own event reader reads the runs' event files)
REFERENCE_PACKAGES=(sentencepiece==0.2.1 tokenizers==0.22.1 numpy==2.4.6 tensorboard==2.21.0)
have='import sentencepiece as s, tokenizers as t, numpy as n, tensorboard as b; assert (s.__version__, t.__version__, n.__version__, b.__version__) == ("0.2.1", "0.22.1", "2.4.6", "2.21.0")'
if [ "${1:-}" = --test ] && ! "$VENV/bin/python" -c "$have" 2>/dev/null; then
  say "installing the reference packages into .venv: ${REFERENCE_PACKAGES[*]}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REFERENCE_PACKAGES[@]}"
fi

# 6. the tests' PyTorch (tests/deepspeed.rs: torch.save / torch.load of the
#    original's DeepSpeed checkpoints, bench/glm_torch.py's loss on them)
if [ "${1:-}" = --test ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  say "installing torch==$TORCH_VERSION into .venv (the tests' PyTorch reference; a large download)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
