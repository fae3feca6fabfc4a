# Sourced by scripts/setup.sh (and its test): finds a usable torch, without
# importing it. `find_torch` sets TORCH_DIR (what torch-sys reads as LIBTORCH),
# TORCH_PYTHON (a python that imports it, if any) and TORCH_FROM (words for
# people), trying LIBTORCH, then the project's .venv ($VENV), then python3's
# own torch; it returns 1 when none is a torch $TORCH_VERSION, and 2 when
# LIBTORCH is set but unusable (said on stderr).
# the version of a libtorch directory (build-version) or torch package (version.py)
dir_version() {
  if [ -f "$1/build-version" ]; then head -1 "$1/build-version"
  elif [ -f "$1/version.py" ]; then sed -n "s/^__version__ = '\([^']*\)'.*/\1/p" "$1/version.py"
  fi
}
usable() { [ -f "$1/lib/libtorch_cpu.so" ] && [ -d "$1/include" ] && case "$(dir_version "$1")" in "$TORCH_VERSION"*) true ;; *) false ;; esac; }
# where a python's torch package is, without importing it
python_torch() { "$1" -c "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')" 2>/dev/null || true; }
venv_torch() { [ -x "$VENV/bin/python" ] && python_torch "$VENV/bin/python"; }
find_torch() {
  local d
  TORCH_DIR="" TORCH_PYTHON="" TORCH_FROM=""
  if [ -n "${LIBTORCH:-}" ]; then
    usable "$LIBTORCH" || { echo "setup: error: LIBTORCH=$LIBTORCH is not a torch $TORCH_VERSION (needs lib/libtorch_cpu.so, include/ and version $TORCH_VERSION; found version '$(dir_version "$LIBTORCH")')" >&2; return 2; }
    TORCH_DIR="$LIBTORCH" TORCH_FROM="LIBTORCH=$LIBTORCH"
    # the python whose torch package it is, when it is one (the .venv's, python3's)
    local real; real="$(realpath "$LIBTORCH" 2>/dev/null || echo "$LIBTORCH")"
    if d="$(venv_torch)" && [ -n "$d" ] && [ "$(realpath "$d" 2>/dev/null)" = "$real" ]; then TORCH_PYTHON="$VENV/bin/python"
    elif command -v python3 >/dev/null && d="$(python_torch python3)" && [ -n "$d" ] && [ "$(realpath "$d" 2>/dev/null)" = "$real" ]; then TORCH_PYTHON="$(command -v python3)"
    fi
  elif d="$(venv_torch)" && [ -n "$d" ] && usable "$d"; then
    TORCH_DIR="$d" TORCH_PYTHON="$VENV/bin/python" TORCH_FROM="the project's .venv ($d)"
  elif command -v python3 >/dev/null && d="$(python_torch python3)" && [ -n "$d" ] && usable "$d"; then
    TORCH_DIR="$d" TORCH_PYTHON="$(command -v python3)" TORCH_FROM="python3's own torch ($d)"
  else
    return 1
  fi
}
