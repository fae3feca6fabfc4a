//! `glm-worker`: the command users and MPI launchers start.
//!
//! It links nothing but std, so it always starts. It finds a libtorch 2.11
//! (the version `tch` 0.24 binds), puts its directory first on
//! `LD_LIBRARY_PATH` and `exec`s `glm-worker-core` from the same directory,
//! keeping the process id, arguments and environment (so mpirun/srun ranks are
//! unaffected). When no usable libtorch exists it prints one clear error
//! instead of the dynamic loader's crash.
//!
//! Search order: `GLM_LIBTORCH_LIB` (a `.../torch/lib` directory; when set,
//! the only place looked at), `LIBTORCH`
//! (a libtorch root), the directories on `LD_LIBRARY_PATH`, the directory the
//! build used, the project's `.venv` next to the binary's checkout, and the
//! `torch` package of `python3` on `PATH`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const REQUIRED_TORCH: &str = "2.11.";
const CORE: &str = "glm-worker-core";

fn main() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot locate own executable: {e}")),
    };
    let core = exe.with_file_name(CORE);
    if !core.is_file() {
        return fail(&format!(
            "{} is missing next to {}\nHINT: build both binaries with `scripts/setup.sh` \
             (or `cargo build --release`) and keep them in one directory",
            core.display(),
            exe.display()
        ));
    }
    let mut looked = Vec::new();
    let mut wrong_version = Vec::new();
    for dir in candidates(&exe) {
        if !dir.join("libtorch_cpu.so").is_file() {
            looked.push(dir);
            continue;
        }
        match torch_version(&dir) {
            Some(v) if !v.starts_with(REQUIRED_TORCH) => {
                wrong_version.push(format!("{} (torch {v})", dir.display()));
                continue;
            }
            _ => {}
        }
        let mut path = OsString::from(&dir);
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
            path.push(":");
            path.push(old);
        }
        let mut argv = std::env::args_os();
        let arg0 = argv.next().unwrap_or_else(|| "glm-worker".into());
        let err = Command::new(&core)
            .arg0(arg0) // usage lines, ps and MPI see the name the user typed
            .args(argv)
            .env("LD_LIBRARY_PATH", path)
            .env("GLM_LIBTORCH_LIB", &dir)
            .exec();
        return fail(&format!("cannot start {}: {err}", core.display()));
    }
    let mut msg = format!("libtorch {REQUIRED_TORCH}x not found (glm-worker needs libtorch_cpu.so from torch==2.11.0)");
    if !wrong_version.is_empty() {
        msg.push_str(&format!("\n  wrong version: {}", wrong_version.join(", ")));
    }
    for d in &looked {
        msg.push_str(&format!("\n  looked in: {}", d.display()));
    }
    msg.push_str(
        "\nHINT: run scripts/setup.sh (installs torch==2.11.0 into .venv), or set \
         GLM_LIBTORCH_LIB to a torch 2.11 `site-packages/torch/lib` directory",
    );
    fail(&msg)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("glm-worker: error: {msg}");
    ExitCode::from(127)
}

/// Directories that may hold libtorch, most explicit first, without duplicates.
fn candidates(exe: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    // An explicit choice is authoritative: no silent fallback elsewhere.
    if let Some(d) = std::env::var_os("GLM_LIBTORCH_LIB").filter(|d| !d.is_empty()) {
        return vec![d.into()];
    }
    if let Some(d) = std::env::var_os("LIBTORCH") {
        out.push(PathBuf::from(d).join("lib"));
    }
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        out.extend(std::env::split_paths(&p).filter(|d| d.join("libtorch_cpu.so").is_file()));
    }
    if let Some(d) = option_env!("GLM_BUILD_LIBTORCH_LIB") {
        out.push(d.into());
    }
    // <checkout>/target/<profile>/glm-worker -> <checkout>/.venv
    if let Some(checkout) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
        out.extend(venv_torch_libs(&checkout.join(".venv")));
    }
    if let Some(d) = python_torch_lib() {
        out.push(d);
    }
    let mut seen = Vec::new();
    out.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        let fresh = !seen.contains(&key);
        seen.push(key);
        fresh
    });
    out
}

fn venv_torch_libs(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else { return Vec::new() };
    entries.flatten().map(|e| e.path().join("site-packages/torch/lib")).filter(|d| d.is_dir()).collect()
}

/// Asks `python3` where its `torch` package lives without importing it (fast).
fn python_torch_lib() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import importlib.util as u,os;s=u.find_spec('torch');print(os.path.join(os.path.dirname(s.origin),'lib') if s else '')"])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The `__version__` recorded in `<torch>/version.py`, if the directory is a
/// torch wheel's `lib`; `None` for a plain libtorch tree (no version file).
fn torch_version(lib: &Path) -> Option<String> {
    let text = std::fs::read_to_string(lib.parent()?.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split(['\'', '"']).nth(1)?.to_string())
}
