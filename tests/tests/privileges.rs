//! memtrace as a user who is not root, with exactly the capabilities the
//! README documents (setpriv as `nobody`, with CAP_BPF, CAP_PERFMON and
//! CAP_SYS_PTRACE and nothing else), tracing root's processes with exact
//! numbers; and each shortfall said in one privilege line, exit status 1: a
//! binary this user cannot read, root of a user namespace (whose
//! capabilities count for nothing outside it).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use memtrace_tests::{
    JsonReport, KEEPER, Target, TempDir, WORKLOADS, assert_bytes_kept_counted, assert_keeper_counted, compile_c,
    final_report, memtrace_bin, require_root, run_memtrace, traced_round,
};

/// The capabilities the README documents for tracing.
const DOCUMENTED: &str = "+bpf,+perfmon,+sys_ptrace";

/// A copy of memtrace that `nobody` can run wherever the build is.
fn memtrace_copy(dir: &TempDir) -> PathBuf {
    let copy = dir.0.join("memtrace");
    std::fs::copy(memtrace_bin(), &copy).unwrap();
    copy
}

/// `memtrace args` as user nobody holding exactly `caps`.
fn as_nobody(caps: &str, memtrace: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(memtrace)
        .args(args);
    cmd
}

/// Traces `target` over its round as nobody with `caps`: the final report.
fn traced(target: &mut Target, caps: &str, memtrace: &Path) -> JsonReport {
    traced_round(target, 0, |args| as_nobody(caps, memtrace, args))
}

#[test]
fn documented_capabilities_trace_a_c_program() {
    require_root();
    let dir = TempDir::new("caps-c");
    let exe = compile_c(&dir, "keeper", KEEPER, &[]);
    let report = traced(&mut Target::spawn(&mut Command::new(&exe)), DOCUMENTED, &memtrace_copy(&dir));
    assert_keeper_counted(&report, &exe);
}

#[test]
fn documented_capabilities_trace_python() {
    require_root();
    let dir = TempDir::new("caps-python");
    let python = "/usr/bin/python3.11";
    let mut target = Target::spawn(Command::new(python).args([WORKLOADS, "plain", "bytes_kept"]));
    let report = traced(&mut target, DOCUMENTED, &memtrace_copy(&dir));
    assert_bytes_kept_counted(&report);
}

#[test]
fn census_only_needs_only_cap_sys_ptrace() {
    require_root();
    let dir = TempDir::new("caps-census");
    let exe = compile_c(&dir, "keeper", KEEPER, &[]);
    let mut target = Target::spawn(&mut Command::new(&exe));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let args = ["--pid", &pid, "--census-only", "--count", "1", "--interval", "0.1", "--format", "json"];
    let (code, stdout, stderr) = run_memtrace(&mut as_nobody("+sys_ptrace", &memtrace_copy(&dir), &args));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(final_report(&stdout).memory.is_some_and(|m| m.rss > 0), "{stdout}");
}

/// Asserts exit status 1 and one line on stderr: the privilege line,
/// saying each of `needles`.
fn assert_privilege_line((code, stdout, stderr): (Option<i32>, String, String), needles: &[&str]) {
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(lines[0].starts_with("memtrace: insufficient privileges: "), "{stderr:?}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{:?} should say {needle:?}", lines[0]);
    }
}

/// Debian's python3.11 copied into a directory only root can search:
/// memtrace must read the interpreter to trace it as Python, which takes
/// CAP_DAC_READ_SEARCH besides the documented set; without it, memtrace
/// says so rather than tracing a Python process as a native one.
#[test]
fn a_binary_this_user_cannot_read_takes_cap_dac_read_search() {
    require_root();
    let dir = TempDir::new("caps-unreadable");
    let private = dir.0.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let python = private.join("python3.11");
    std::fs::copy("/usr/bin/python3.11", &python).unwrap();
    let memtrace = memtrace_copy(&dir);

    let mut target = Target::spawn(Command::new(&python).args([WORKLOADS, "plain", "bytes_kept"]));
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let refused = run_memtrace(&mut as_nobody(DOCUMENTED, &memtrace, &["--pid", &pid, "--count", "1"]));
    let refusal = format!("cannot read {}: permission denied", python.display());
    assert_privilege_line(refused, &[&refusal, "CAP_DAC_READ_SEARCH"]);
    drop(target);

    let mut target = Target::spawn(Command::new(&python).args([WORKLOADS, "plain", "bytes_kept"]));
    let report = traced(&mut target, &format!("{DOCUMENTED},+dac_read_search"), &memtrace);
    assert_bytes_kept_counted(&report);
}

/// Root of a user namespace holds every capability there, and none over
/// the host: the kernel refuses, and memtrace says what it needs.
#[test]
fn root_of_a_user_namespace_gets_the_privilege_line() {
    require_root();
    let dir = TempDir::new("caps-userns");
    let exe = compile_c(&dir, "keeper", KEEPER, &[]);
    let mut target = Target::spawn(&mut Command::new(&exe));
    target.expect_line("ready");
    let memtrace = memtrace_copy(&dir);
    // A process of the host's: its memory cannot be read from inside.
    let pid = target.pid().to_string();
    let outside =
        run_memtrace(Command::new("unshare").args(["--user", "--map-root-user"]).arg(&memtrace).args(["--pid", &pid]));
    assert_privilege_line(outside, &[&format!("cannot read /proc/{pid}/maps: permission denied"), "CAP_SYS_PTRACE"]);
    // A process of its own namespace: readable, but eBPF is the host's to allow.
    let mut own = Target::spawn(Command::new("unshare").args(["--user", "--map-root-user"]).arg(&exe));
    own.expect_line("ready");
    let own_pid = own.pid().to_string();
    let inside = run_memtrace(
        Command::new("nsenter").args(["--user", "--target", &own_pid]).arg(&memtrace).args(["--pid", &own_pid]),
    );
    assert_privilege_line(
        inside,
        &["cannot load memtrace's eBPF maps: permission denied", "in the host's user namespace"],
    );
}
