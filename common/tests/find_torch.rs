//! `scripts/find_torch.sh`, the part of `scripts/setup.sh` that picks the
//! torch 2.11 to build against: LIBTORCH, then the project's .venv, then
//! python3's own torch, with fake torch directories and pythons.

use std::path::Path;
use std::process::Command;

fn fake_torch(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::create_dir_all(dir.join("include")).unwrap();
    std::fs::write(dir.join("lib/libtorch_cpu.so"), "").unwrap();
    std::fs::write(dir.join("version.py"), format!("__version__ = '{version}'\ndebug = False\n")).unwrap();
}

/// A `python` that answers find_torch's question with `torch_dir`.
fn fake_python(path: &Path, torch_dir: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\necho {}\n", torch_dir.display())).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// (status, TORCH_DIR|TORCH_PYTHON|TORCH_FROM, stderr)
fn find(libtorch: Option<&Path>, venv: &Path, path: &str) -> (i32, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/find_torch.sh");
    let mut c = Command::new("bash");
    c.args(["-c", &format!("TORCH_VERSION=2.11.0; source {}; find_torch; s=$?; echo \"$TORCH_DIR|$TORCH_PYTHON|$TORCH_FROM\"; exit $s", script.display())])
        .env("VENV", venv)
        .env("PATH", path)
        .env_remove("LIBTORCH");
    if let Some(l) = libtorch {
        c.env("LIBTORCH", l);
    }
    let o = c.output().unwrap();
    (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).trim().to_string(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn libtorch_then_venv_then_python3() {
    let d = tempfile::tempdir().unwrap();
    let (good, old, venv_torch) = (d.path().join("libtorch"), d.path().join("old"), d.path().join("venv-torch"));
    fake_torch(&good, "2.11.0+cpu");
    fake_torch(&old, "2.10.0");
    fake_torch(&venv_torch, "2.11.0");
    let bin = d.path().join("bin");
    fake_python(&bin.join("python3"), &good);
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let no_venv = d.path().join("no-venv");

    // python3's own torch when nothing else is there
    let (s, out, _) = find(None, &no_venv, &path);
    assert_eq!(s, 0);
    assert_eq!(out, format!("{0}|{1}|python3's own torch ({0})", good.display(), bin.join("python3").display()));
    // the project's .venv before python3's
    let venv = d.path().join("venv");
    fake_python(&venv.join("bin/python"), &venv_torch);
    let (s, out, _) = find(None, &venv, &path);
    assert_eq!(s, 0);
    assert!(out.starts_with(&format!("{}|{}|the project's .venv", venv_torch.display(), venv.join("bin/python").display())), "{out}");
    // LIBTORCH before both, and a wrong one is an error, not a fallback
    // (with the python whose package it is, where one is: python3's here, the .venv's next)
    let (s, out, _) = find(Some(&good), &venv, &path);
    assert_eq!((s, out), (0, format!("{0}|{1}|LIBTORCH={0}", good.display(), bin.join("python3").display())));
    let (s, out, _) = find(Some(&venv_torch), &venv, &path);
    assert_eq!((s, out), (0, format!("{0}|{1}|LIBTORCH={0}", venv_torch.display(), venv.join("bin/python").display())));
    let lone = d.path().join("lone");
    fake_torch(&lone, "2.11.0");
    let (s, out, _) = find(Some(&lone), &venv, &path);
    assert_eq!((s, out), (0, format!("{0}||LIBTORCH={0}", lone.display())));
    let (s, _, err) = find(Some(&old), &venv, &path);
    assert_eq!(s, 2);
    assert!(err.contains(&format!("LIBTORCH={} is not a torch 2.11.0", old.display())) && err.contains("found version '2.10.0'"), "{err}");
    // a python3 with another torch, and no .venv: none found (setup.sh installs)
    fake_python(&bin.join("python3"), &old);
    let (s, out, _) = find(None, &no_venv, &path);
    assert_eq!((s, out), (1, "||".to_string()));
}
