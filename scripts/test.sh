#!/usr/bin/env bash
# Sets up what is missing (scripts/setup.sh), then runs every test.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh --test
# the torch setup.sh chose (LIBTORCH for torch-sys)
source target/torch.env
unset LIBTORCH_USE_PYTORCH
# Several test processes share 2 cores: one intra-op thread each.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --release --workspace "$@"
