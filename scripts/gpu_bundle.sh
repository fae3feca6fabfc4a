#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on a GPU machine that has CUDA and
# torch 2.11 but neither this project's build nor OpenMPI:
#   <out>/bin/    glm-worker, glm-worker-core, glm-launch (release build; glm-launch for the plan step)
#   <out>/mpi/    the OpenMPI 4.1 runtime libraries they link against, its
#                 component plugins (a singleton world needs no mpirun), and
#                 mpirun (bin/mpirun, with PMIx's plugins in lib/pmix and
#                 Debian's MCA settings in etc/) for gpu_check.sh's two-rank
#                 step; gpu_check.sh relocates it with OPAL_PREFIX
#   <out>/data/   the default corpus (glm_pretrain/data/data.json)
# Usage: scripts/gpu_bundle.sh [out-dir]   (default: .gpu, git-ignored)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/.gpu}"
scripts/setup.sh
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/mpi/lib" "$OUT/mpi/bin" "$OUT/mpi/etc" "$OUT/data"
cp target/release/glm-worker target/release/glm-worker-core target/release/glm-launch "$OUT/bin/"
cp glm_pretrain/data/data.json "$OUT/data/"

# the non-system, non-torch libraries glm-worker-core and OpenMPI's plugins load
MPILIB="$(dirname "$(readlink -f "$(ldd target/release/glm-worker-core | awk '/libmpi\.so/ { print $3 }')")")"
PLUGINS="$MPILIB/openmpi/lib/openmpi3"
[ -d "$PLUGINS" ] || PLUGINS="$(dirname "$(find /usr/lib -name mca_ess_singleton.so -print -quit)")"
cp -r "$PLUGINS" "$OUT/mpi/lib/openmpi3"
# mpirun itself (orterun: on one node it starts the ranks itself, no orted),
# the PMIx server's plugins and the MCA settings Debian ships
ORTERUN="$(readlink -f "$(command -v mpirun)")"
cp "$ORTERUN" "$OUT/mpi/bin/mpirun"
PMIXLIB="$(dirname "$(readlink -f "$(ldconfig -p | awk '/libpmix\.so\.2 / { print $NF; exit }')")")"
[ -d "$PMIXLIB/pmix" ] && cp -r "$PMIXLIB/pmix" "$OUT/mpi/lib/pmix"
[ -f /etc/openmpi/openmpi-mca-params.conf ] && cp /etc/openmpi/openmpi-mca-params.conf "$OUT/mpi/etc/"
libs=$( (ldd target/release/glm-worker-core "$ORTERUN"; for p in "$OUT"/mpi/lib/openmpi3/*.so "$OUT"/mpi/lib/pmix/*.so; do [ -f "$p" ] && ldd "$p"; done) 2>/dev/null |
  awk '$3 ~ /^\// { print $3 }' | sort -u |
  grep -E 'libmpi|libopen-|libmca_common|libhwloc|libevent|libpmix|libudev|libnl|libmunge|libltdl' || true)
for l in $libs; do cp -L "$l" "$OUT/mpi/lib/"; done
if [ -d "$MPILIB/openmpi/share" ]; then cp -r "$MPILIB/openmpi/share" "$OUT/mpi/"; fi
[ -d /usr/share/openmpi ] && mkdir -p "$OUT/mpi/share" && cp -r /usr/share/openmpi "$OUT/mpi/share/"
echo "gpu_bundle: $(du -sh "$OUT" | cut -f1) in $OUT ($(ls "$OUT/mpi/lib" | grep -c '\.so') MPI libraries)"
