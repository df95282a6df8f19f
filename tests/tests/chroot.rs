//! A process whose root is not memtrace's: chrooted in memtrace's own mount
//! namespace, where /proc/PID/maps names its files by their full host path,
//! and chrooted in a mount namespace of its own, where the kernel names them
//! from that namespace's root. Each is traced with exact numbers: a C
//! program in a root built here (the program and the libraries `ldd`
//! names), and CPython in a root that is a bind mount of `/`.

use std::{path::PathBuf, process::Command};

use memtrace_tests::{
    JsonReport, KEEPER, Target, TempDir, WORKLOADS, assert_bytes_kept_counted, assert_keeper_counted, compile_c,
    memtrace_command, pyenv, require_root, traced_round,
};

/// KEEPER built in `dir`, and a root directory holding it as /keeper with
/// every library it loads at the path it loads it from.
fn build_root(dir: &TempDir) -> (PathBuf, PathBuf) {
    let exe = compile_c(dir, "chrooted", KEEPER, &[]);
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&exe, root.join("keeper")).unwrap();
    let ldd = Command::new("ldd").arg(&exe).output().expect("ldd runs");
    for library in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        let inside = root.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(library, &inside).unwrap_or_else(|e| panic!("cannot copy {library}: {e}"));
    }
    (exe, root)
}

/// Traces `target` over its round: the final report.
fn traced(mut target: Target) -> JsonReport {
    traced_round(&mut target, 0, memtrace_command)
}

#[test]
fn chrooted_in_our_mount_namespace() {
    require_root();
    let dir = TempDir::new("chroot");
    let (exe, root) = build_root(&dir);
    let report = traced(Target::spawn(Command::new("chroot").arg(&root).arg("/keeper")));
    assert_keeper_counted(&report, &exe);
}

#[test]
fn chrooted_in_a_mount_namespace_of_its_own() {
    require_root();
    let dir = TempDir::new("chroot-ns");
    let (exe, root) = build_root(&dir);
    let target = Target::spawn(
        Command::new("unshare").args(["--mount", "--propagation", "private", "--root"]).arg(&root).arg("/keeper"),
    );
    assert_keeper_counted(&traced(target), &exe);
}

#[test]
fn python_chrooted_in_a_mount_namespace_of_its_own() {
    require_root();
    let dir = TempDir::new("chroot-python");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let python = pyenv("3.12.1");
    assert!(python.exists(), "{} is a supported interpreter", python.display());
    // The root is `/` again, so every path inside is the host's; the kernel
    // names the process's files ROOT/... all the same.
    let target = Target::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind / "$1" && shift && exec chroot "$@""#)
            .arg("sh")
            .arg(&root)
            .arg(&root)
            .arg(&python)
            .args([WORKLOADS, "plain", "bytes_kept"]),
    );
    let report = traced(target);
    assert_eq!(report.interpreter.as_deref(), Some("CPython 3.12.1"), "{report:?}");
    assert_bytes_kept_counted(&report);
}
