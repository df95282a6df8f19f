//! The kernel facts memtrace reads from BTF, where a task keeps its
//! user-space thread pointer (`task_struct.thread.fsbase`) and its id
//! (`task_struct.pid`), against the kernel's own tool: bpftool's dump of
//! the running kernel's BTF.

use std::{collections::HashMap, process::Command};

use memtrace::probes::kernel::task_struct_offset;
use memtrace_tests::ensure_package;

/// A struct in bpftool's raw BTF dump: its name and its members' (name,
/// type id, bit offset).
struct Struct {
    name: String,
    members: Vec<(String, u32, u64)>,
}

/// The structs of the running kernel's BTF by type id, as bpftool lists
/// them: `[ID] STRUCT 'name' size=S vlen=N`, then one
/// `'member' type_id=T bits_offset=B` line per member.
fn kernel_structs() -> HashMap<u32, Struct> {
    ensure_package("bpftool", "bpftool").unwrap();
    let out = Command::new("bpftool").args(["btf", "dump", "file", "/sys/kernel/btf/vmlinux"]).output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let quoted = |text: &str| text.trim().trim_matches('\'').to_owned();
    let field = |text: &str, key: &str| {
        text.split_whitespace().find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    let mut structs = HashMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = line.strip_prefix('[') {
            let (id, rest) = rest.split_once("] ").unwrap();
            current = None;
            if let Some(rest) = rest.strip_prefix("STRUCT ") {
                let id = id.parse().unwrap();
                structs.insert(id, Struct { name: quoted(rest.split_once(" size=").unwrap().0), members: Vec::new() });
                current = Some(id);
            }
        } else if let Some(id) = current {
            let (name, rest) = line.trim().split_once(' ').unwrap();
            let member = (quoted(name), field(rest, "type_id").unwrap() as u32, field(rest, "bits_offset").unwrap());
            structs.get_mut(&id).unwrap().members.push(member);
        }
    }
    structs
}

#[test]
fn finds_fsbase_and_pid_where_bpftool_does() {
    let structs = kernel_structs();
    let named = |name: &str| structs.values().find(|s| s.name == name).unwrap_or_else(|| panic!("no struct {name}"));
    let member = |s: &Struct, name: &str| {
        s.members.iter().find(|m| m.0 == name).unwrap_or_else(|| panic!("{} has no member {name}", s.name)).clone()
    };
    let (_, thread_type, thread_bits) = member(named("task_struct"), "thread");
    let thread_struct = &structs[&thread_type];
    assert_eq!(thread_struct.name, "thread_struct");
    let (_, _, fsbase_bits) = member(thread_struct, "fsbase");
    assert_eq!(task_struct_offset(&["thread", "fsbase"]).unwrap(), (thread_bits + fsbase_bits) / 8);
    let (_, _, pid_bits) = member(named("task_struct"), "pid");
    assert_eq!(task_struct_offset(&["pid"]).unwrap(), pid_bits / 8);
}
