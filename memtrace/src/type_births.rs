//! `--type NAME`: only the births of one type's objects are traced, and
//! the object census says which of them are still alive. [`TypePlan`]
//! turns (a process, a type's name) into the type objects to watch and the
//! probes to attach: for a class, `PyType_GenericAlloc`, where every
//! instance of a class is allocated (the kernel side's `type_alloc`: one
//! trap per instance of any class, a second, the return, only for the
//! watched one); for a built-in type, which is not allocated there and is
//! also reused from free lists, every `_Py_NewReference` and its inlined
//! copies (one trap per object born, of any type). No allocator and no
//! free is probed. [`Births`] then keeps, per process, the kernel side's
//! record of each birth (ALLOCS: address, size, site) honest against each
//! census: a record whose object the census still finds at its address,
//! with the watched type, is outstanding; one it does not find, born
//! before the census began, is dead and dropped; a new birth at an address
//! replaces the record there. Each census also looks the name up again, so
//! a class defined anew under the same name (a re-run class statement, a
//! reloaded module) is watched from then on.

use std::collections::HashMap;

use anyhow::{Result, bail};
use rustc_hash::FxHashSet;

use memtrace_common::{NO_ARG, ProbeCookie, SiteKey, WatchedType, layer, op};

use crate::{
    census::{
        CensusTaker, ObjectCensus,
        types::{HAVE_GC, HEAPTYPE, TypeInfo},
    },
    collect,
    probes::{
        attach::Tracer,
        placement,
        plan::{AttachPoint, Program},
    },
    process::Target,
    python::Interpreter,
};

/// Where every instance of a class is allocated, in every supported
/// version (3.13's specialised calls reach it through
/// `_PyType_NewManagedObject`); exported, so stripped builds have it too.
const CLASS_ALLOC: &str = "PyType_GenericAlloc";

/// What `--type` names: a class by its name (`Record`) or qualified by its
/// module (`waste_memory.Record`), or a built-in type (`dict`), as the
/// census names types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeName(String);

impl TypeName {
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = !text.is_empty()
            && text.split('.').all(|part| {
                !part.is_empty()
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                    && !part.starts_with(|c: char| c.is_ascii_digit())
            });
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!("{text:?} is not a type's name (a name such as MyObject, or qualified: module.MyObject)"))
        }
    }

    /// Whether the census's name of a type is this one: the same, or, for
    /// a bare name, the class of that name in any module.
    fn matches(&self, census_name: &str) -> bool {
        census_name == self.0 || (!self.0.contains('.') && census_name.rsplit('.').next() == Some(self.0.as_str()))
    }
}

impl std::fmt::Display for TypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `PyType_GenericAlloc`'s address in the process.
fn class_alloc(target: &Target, interpreter: &Interpreter) -> Option<u64> {
    let bias = crate::python::load_bias(target, &interpreter.path, &interpreter.elf)?;
    Some(interpreter.elf.symbol(CLASS_ALLOC)?.vaddr.wrapping_add(bias))
}

/// One type of one process, found and planned: what host mode's
/// `--escalate` would build for a growing type, too.
pub struct TypePlan {
    /// The type as the census names it (`__main__.Record`, `dict`).
    pub name: String,
    /// Its type objects (more than one once it is defined anew), with the
    /// sizes the kernel side gives their objects.
    pub watched: Vec<(u64, WatchedType)>,
    pub points: Vec<AttachPoint>,
    /// A class whose instances `PyType_GenericAlloc` allocates, probed
    /// there; otherwise births are seen at `_Py_NewReference`.
    pub is_class: bool,
    /// `PyType_GenericAlloc`'s address in the process.
    pub class_alloc: Option<u64>,
}

impl TypePlan {
    /// Finds `wanted` in `target`'s census and plans its probes;
    /// `allocator_points` is the process's usual plan, whose
    /// `_Py_NewReference` probes a built-in type uses. A name that names
    /// no type, or classes of several modules, is refused.
    pub fn new(
        target: &Target,
        interpreter: &Interpreter,
        census: &mut CensusTaker,
        wanted: &TypeName,
        allocator_points: &[AttachPoint],
    ) -> Result<Self> {
        let pid = target.pid;
        let taken = census.take();
        let incomplete = taken.objects.map(|o| o.incomplete).unwrap_or_default();
        let found = census.types_named(|name| wanted.matches(name));
        let mut names: Vec<&str> = found.iter().map(|(_, info)| info.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        // A name that is exactly one type's is that type, whatever classes
        // of other modules share it.
        if names.contains(&wanted.0.as_str()) {
            names.retain(|n| *n == wanted.0);
        }
        let name = match names[..] {
            [] if !incomplete.is_empty() => bail!(
                "pid {pid} ({}): no type named {wanted} found, but its census is incomplete ({}): try again",
                target.comm,
                incomplete.join("; ")
            ),
            [] => bail!(
                "pid {pid} ({}) has no type named {wanted}: none of its objects is of that type and no class of that name is on its GC's lists (names are as its census shows them, e.g. MyObject, mymodule.MyObject, dict)",
                target.comm
            ),
            [one] => one.to_owned(),
            _ => bail!(
                "--type {wanted} is ambiguous in pid {pid} ({}): it names {}; give one of them",
                target.comm,
                names.join(", ")
            ),
        };
        let layout = &interpreter.layout;
        let chosen: Vec<&(u64, TypeInfo)> = found.iter().filter(|(_, info)| info.name == name).collect();
        // A class whose instances PyType_GenericAlloc allocates (tp_alloc
        // is inherited: a dict subclass's, on 3.11 and later, is dict's
        // own) is probed there; any other type where objects are born.
        let generic_alloc = class_alloc(target, interpreter);
        let is_class = chosen.iter().all(|(_, info)| info.flags & HEAPTYPE != 0 && Some(info.alloc) == generic_alloc);
        let watched = chosen.iter().map(|(a, info)| (*a, sizes(info, layout, is_class))).collect();
        let points = if is_class {
            class_points(target, interpreter)?
        } else {
            let births: Vec<AttachPoint> = allocator_points
                .iter()
                .filter(|p| p.program == Program::NewReference)
                .map(|p| AttachPoint { program: Program::TypeNewReference, ..p.clone() })
                .collect();
            if births.is_empty() {
                bail!(
                    "CPython {} in pid {pid}: no place where objects are born was found to probe",
                    interpreter.version
                );
            }
            births
        };
        Ok(Self { name, watched, points, is_class, class_alloc: generic_alloc })
    }

    /// Said under every report's header.
    pub fn note(&self) -> String {
        if self.is_class {
            format!(
                "--type {}: only births of its instances are traced, at {CLASS_ALLOC} (every class's instances trap once there, this one's twice); an instance counts as outstanding while the census finds it at its address",
                self.name
            )
        } else {
            format!(
                "--type {}: a type not allocated by {CLASS_ALLOC} (a built-in type, whose objects are also reused from free lists, or a class inheriting another allocator): its births are seen at _Py_NewReference, which traps once per object of any type born; an object counts as outstanding while the census finds it at its address",
                self.name
            )
        }
    }
}

/// The allocation a type's object takes: its pre-header (PyGC_Head, and
/// the managed dict and weak reference pointers of 3.11+), its basic size,
/// and its items. `PyType_GenericAlloc(type, n)` allocates n + 1 items.
fn sizes(info: &TypeInfo, layout: &crate::python::layouts::Layout, is_class: bool) -> WatchedType {
    let gc = if info.flags & HAVE_GC != 0 { layout.gc_head_size } else { 0 };
    let preheader = if info.flags & layout.preheader_flags != 0 { 16 } else { 0 };
    let extra_item = if is_class { info.item_size } else { 0 };
    WatchedType { size: gc + preheader + info.basic_size + extra_item, item_size: info.item_size }
}

fn class_points(target: &Target, interpreter: &Interpreter) -> Result<Vec<AttachPoint>> {
    let elf = &interpreter.elf;
    let symbol = elf.symbol(CLASS_ALLOC);
    let found = symbol.and_then(|s| Some((s.vaddr, elf.symbol_bytes(s).ok()?, elf.file_offset(s.vaddr)?)));
    let Some((_, code, file_offset)) = found else {
        bail!("CPython {} ({}) has no {CLASS_ALLOC} to probe", interpreter.version, interpreter.path);
    };
    let cookie = ProbeCookie {
        op: op::ALLOC,
        layer: layer::PYMALLOC,
        size_reg: NO_ARG,
        count_reg: NO_ARG,
        ptr_reg: NO_ARG,
        function: 0,
    };
    Ok(vec![AttachPoint {
        program: Program::TypeAlloc,
        binary: interpreter.path.clone(),
        host_path: target.paths.host_path(&interpreter.path),
        symbol: CLASS_ALLOC.to_owned(),
        file_offset,
        cookie: cookie.to_u64(),
        placement: placement::at_entry(code),
    }])
}

/// One process's births of its watched type, kept against its censuses.
pub struct Births {
    pid: u32,
    name: String,
    is_class: bool,
    layout: crate::python::layouts::Layout,
    /// `PyType_GenericAlloc`'s address, which a class defined anew must
    /// allocate with to be seen where the first was.
    class_alloc: Option<u64>,
    types: FxHashSet<u64>,
}

impl Births {
    /// Starts counting `plan`'s type in process `pid`, whose probes are
    /// attached; its censuses must then list the type's objects
    /// ([`Births::watch`]).
    pub fn start(tracer: &mut Tracer, pid: u32, plan: &TypePlan, interpreter: &Interpreter) -> Result<Self> {
        let mut births = Self {
            pid,
            name: plan.name.clone(),
            is_class: plan.is_class,
            class_alloc: plan.class_alloc,
            layout: interpreter.layout,
            types: FxHashSet::default(),
        };
        births.add(tracer, &plan.watched)?;
        Ok(births)
    }

    /// Has `census` list the objects of the types watched.
    pub fn watch(&self, census: &mut CensusTaker) {
        census.watch(self.types.clone());
    }

    fn add(&mut self, tracer: &mut Tracer, watched: &[(u64, WatchedType)]) -> Result<()> {
        for &(type_object, sizes) in watched {
            if self.types.insert(type_object) {
                tracer.watch_type(self.pid, type_object, sizes)?;
            }
        }
        Ok(())
    }

    /// The outstanding objects by site as of a census begun at
    /// `census_started_ns` (CLOCK_MONOTONIC) that found `objects`: every
    /// birth recorded before it whose object it found. The others born
    /// before it are dead and forgotten; those born since wait for the next
    /// census. A census that is incomplete proves no death: its objects
    /// not found count as outstanding, and nothing is forgotten. Then the
    /// name is looked up again, for the next census.
    pub fn outstanding(
        &mut self,
        tracer: &mut Tracer,
        census: &mut CensusTaker,
        objects: Option<&ObjectCensus>,
        census_started_ns: u64,
    ) -> Result<HashMap<SiteKey, (u64, u64)>> {
        let complete = objects.is_some_and(|o| o.incomplete.is_empty());
        let mut outstanding: HashMap<SiteKey, (u64, u64)> = HashMap::new();
        let mut dead = Vec::new();
        for (key, info) in collect::allocations(tracer, self.pid)? {
            if info.timestamp_ns >= census_started_ns {
                continue;
            }
            if !complete || objects.is_some_and(|o| o.watched.contains(&key.addr)) {
                let slot = outstanding.entry(info.site).or_default();
                slot.0 += info.size;
                slot.1 += 1;
            } else {
                dead.push((key, info.timestamp_ns));
            }
        }
        tracer.forget_births(self.pid, &dead)?;
        let again: Vec<(u64, WatchedType)> = census
            .types_named(|name| name == self.name)
            .into_iter()
            .filter(|(_, info)| !self.is_class || self.class_alloc == Some(info.alloc))
            .map(|(address, info)| (address, sizes(&info, &self.layout, self.is_class)))
            .collect();
        self.add(tracer, &again)?;
        self.watch(census);
        Ok(outstanding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bare_or_qualified() {
        let record = TypeName::parse("Record").unwrap();
        assert!(record.matches("__main__.Record") && record.matches("app.models.Record") && record.matches("Record"));
        assert!(!record.matches("__main__.Records"));
        let qualified = TypeName::parse("app.Record").unwrap();
        assert!(qualified.matches("app.Record") && !qualified.matches("other.Record"));
        assert!(TypeName::parse("dict").unwrap().matches("dict"));
        for bad in ["", "a..b", ".Record", "Record.", "my Record", "1abc", "a-b"] {
            assert!(TypeName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
