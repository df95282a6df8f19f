//! `--pprof FILE`: what is outstanding, as a gzipped pprof heap profile
//! (profile.proto), for `go tool pprof` and the continuous profilers that
//! ingest pprof (Pyroscope, Parca). Each sample is one whole traceback of
//! one process with its outstanding count and bytes (`inuse_objects`,
//! `inuse_space`, the latter the default), labelled with the process's pid
//! and command. Python frames are functions (qualified name, file, first
//! line) at locations with their line; native frames also carry their
//! mapping (the file, per process) and address, so a profiler can
//! symbolize them again. `go tool pprof -lines` shows sites as tracemalloc
//! does. The file is replaced at every report and holds every traced
//! process's latest report.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    path::PathBuf,
    time::SystemTime,
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

#[path = "profile_proto.rs"]
#[allow(clippy::all)]
mod proto;

use super::{Report, Writer, replace_file};
use crate::snapshot::{Frame, NativeLocation, Snapshot};

pub struct PprofWriter {
    path: PathBuf,
    /// Latest report of each process: (time, comm, snapshot).
    latest: BTreeMap<u32, (SystemTime, String, Snapshot)>,
}

impl PprofWriter {
    pub fn new(path: PathBuf) -> Self {
        Self { path, latest: BTreeMap::new() }
    }
}

impl Writer for PprofWriter {
    fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let entry = (report.time, report.process.comm.clone(), report.current.clone());
        self.latest.insert(report.process.pid, entry);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&profile(&self.latest).encode_to_vec())?;
        replace_file(&self.path, &gz.finish()?)
    }
}

/// The profile's tables, each entry added once.
#[derive(Default)]
struct Tables {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    locations: Vec<proto::Location>,
    /// By frame and, for native frames, the process and address.
    location_ids: HashMap<(Frame, Option<(u32, u64)>), u64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(i64, i64, i64), u64>,
    mappings: Vec<proto::Mapping>,
    mapping_ids: HashMap<(u32, String), u64>,
}

impl Tables {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    /// The location of `frame` in process `pid`.
    fn location(&mut self, pid: u32, frame: &Frame) -> u64 {
        let key = (frame.clone(), frame.native.as_ref().map(|n| (pid, n.address)));
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let function_id = self.function(frame);
        let (mapping_id, address) = match &frame.native {
            Some(native) => (self.mapping(pid, native), native.address),
            None => (0, 0),
        };
        self.locations.push(proto::Location {
            id,
            mapping_id,
            address,
            line: vec![proto::Line { function_id, line: i64::from(frame.lineno), column: 0 }],
            ..Default::default()
        });
        self.location_ids.insert(key, id);
        id
    }

    /// The frame's function; one named as tracemalloc prints the frame
    /// when its name is unknown.
    fn function(&mut self, frame: &Frame) -> u64 {
        let name = match &frame.function {
            Some(name) => self.string(name),
            None if frame.lineno == 0 => self.string(&frame.filename),
            None => self.string(&frame.to_string()),
        };
        // A native frame without line information is named after its
        // symbol; its file is then the module's.
        let file = match &frame.native {
            Some(native) if frame.lineno == 0 => native.module.as_str(),
            _ => frame.filename.as_str(),
        };
        let filename = self.string(file);
        let start_line = i64::from(frame.first_lineno.unwrap_or(0));
        let key = (name, filename, start_line);
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(proto::Function { id, name, system_name: 0, filename, start_line });
        self.function_ids.insert(key, id);
        id
    }

    /// The module's mapping in process `pid`, spanning every address seen
    /// in it: where the module's offset 0 sits, up to the highest address.
    fn mapping(&mut self, pid: u32, native: &NativeLocation) -> u64 {
        let key = (pid, native.module.clone());
        let id = match self.mapping_ids.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.mappings.len() as u64 + 1;
                let filename = self.string(&native.module);
                self.mappings.push(proto::Mapping {
                    id,
                    memory_start: native.address - native.offset,
                    memory_limit: native.address + 1,
                    filename,
                    has_functions: true,
                    has_filenames: true,
                    has_line_numbers: true,
                    ..Default::default()
                });
                self.mapping_ids.insert(key, id);
                id
            }
        };
        let mapping = &mut self.mappings[id as usize - 1];
        mapping.memory_limit = mapping.memory_limit.max(native.address + 1);
        id
    }
}

fn profile(latest: &BTreeMap<u32, (SystemTime, String, Snapshot)>) -> proto::Profile {
    let mut t = Tables::default();
    t.string("");
    let value_type =
        |t: &mut Tables, kind: &str, unit: &str| proto::ValueType { r#type: t.string(kind), unit: t.string(unit) };
    let sample_type = vec![value_type(&mut t, "inuse_objects", "count"), value_type(&mut t, "inuse_space", "bytes")];
    let mut samples = Vec::new();
    for (&pid, (_, comm, snapshot)) in latest {
        let labels = [
            proto::Label { key: t.string("pid"), num: i64::from(pid), ..Default::default() },
            proto::Label { key: t.string("comm"), str: t.string(comm), ..Default::default() },
        ];
        // Sorted so that the same snapshot always encodes alike.
        let mut stats: Vec<_> = snapshot.stats.iter().collect();
        stats.sort_by(|a, b| a.0.cmp(b.0));
        for (traceback, stat) in stats {
            samples.push(proto::Sample {
                // The leaf first, as pprof and Traceback both order them.
                location_id: traceback.0.iter().map(|f| t.location(pid, f)).collect(),
                value: vec![stat.count as i64, stat.size as i64],
                label: labels.to_vec(),
            });
        }
    }
    let newest = latest.values().map(|(time, ..)| *time).max().unwrap_or(SystemTime::UNIX_EPOCH);
    let default_sample_type = t.string("inuse_space");
    let period_type = Some(value_type(&mut t, "space", "bytes"));
    let comment = vec![t.string("memtrace: blocks allocated since attach and not freed, by traceback")];
    proto::Profile {
        sample_type,
        sample: samples,
        mapping: t.mappings,
        location: t.locations,
        function: t.functions,
        time_nanos: newest.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        period_type,
        period: 1,
        comment,
        default_sample_type,
        string_table: t.strings,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::report::text::tests::sample;

    fn decode(path: &std::path::Path) -> proto::Profile {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
        proto::Profile::decode(bytes.as_slice()).unwrap()
    }

    #[test]
    fn every_traceback_is_a_sample_with_its_frames_leaf_first() {
        let path = std::env::temp_dir().join(format!("memtrace-pprof-{}.pb.gz", std::process::id()));
        PprofWriter::new(path.clone()).write(&sample(false)).unwrap();
        let p = decode(&path);
        std::fs::remove_file(&path).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<(&str, &str)> = p.sample_type.iter().map(|v| (s(v.r#type), s(v.unit))).collect();
        assert_eq!(types, [("inuse_objects", "count"), ("inuse_space", "bytes")]);
        assert_eq!(s(p.default_sample_type), "inuse_space");
        // The sample's current snapshot: the leak and one new block.
        assert_eq!(p.sample.len(), 2);
        let leak = p.sample.iter().find(|x| x.value == [51_734, 3_708_000]).expect("the leak's sample");
        let frames: Vec<(&str, &str, i64, i64)> = leak
            .location_id
            .iter()
            .map(|&id| {
                let line = &p.location[id as usize - 1].line[0];
                let function = &p.function[line.function_id as usize - 1];
                (s(function.name), s(function.filename), function.start_line, line.line)
            })
            .collect();
        assert_eq!(
            frames,
            [("handle_request", "/w/app.py", 14, 16), ("main", "/w/app.py", 25, 27), ("<module>", "/w/app.py", 1, 33)]
        );
        assert_eq!((s(leak.label[0].key), leak.label[0].num), ("pid", 24733));
        assert_eq!(s(leak.label[1].str), "python");
        // Frames shared by the two tracebacks are one location.
        assert_eq!(p.location.len(), 4);
        assert!(p.mapping.is_empty(), "Python frames have no mapping");
    }

    #[test]
    fn native_frames_have_their_mapping_and_address() {
        let path = std::env::temp_dir().join(format!("memtrace-pprof-native-{}.pb.gz", std::process::id()));
        let mut report = sample(false);
        report.current = report.previous.clone();
        PprofWriter::new(path.clone()).write(&report).unwrap();
        let p = decode(&path);
        std::fs::remove_file(&path).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        let native = p.location.iter().find(|l| l.mapping_id != 0).expect("a native location");
        assert_eq!(native.address, 0x7f00_0009_a01c);
        let mapping = &p.mapping[native.mapping_id as usize - 1];
        assert_eq!(s(mapping.filename), "/usr/lib/x86_64-linux-gnu/libc.so.6");
        // The module's offset 0 is where the address minus its offset is.
        assert_eq!((mapping.memory_start, mapping.file_offset), (0x7f00_0000_0000, 0));
        assert!(mapping.memory_limit > native.address);
        let function = &p.function[native.line[0].function_id as usize - 1];
        assert_eq!((s(function.name), s(function.filename)), ("malloc", "/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }
}
