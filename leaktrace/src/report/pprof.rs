//! pprof profiles (`profile.proto`, gzipped): unfreed bytes and objects, and bytes and objects
//! allocated, per merged stack, with Python and native frames as functions with file and line —
//! what `go tool pprof`, Pyroscope and Grafana load.

use std::collections::HashMap;
use std::io::Write;

use flate2::write::GzEncoder;
use prost::Message;

use super::frames::{shown, Named};
use super::Report;

/// `profile.proto`'s messages, the fields leaktrace fills.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// Interns strings, functions and locations.
#[derive(Default)]
struct Tables {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<Named, u64>,
}

impl Tables {
    fn new() -> Self {
        let mut t = Self::default();
        t.string(""); // profile.proto: string 0 is the empty string.
        t
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn location(&mut self, f: &Named) -> u64 {
        if let Some(id) = self.location_ids.get(f) {
            return *id;
        }
        // A native function's file is its source file, or failing that its module.
        let file = f
            .file
            .clone()
            .or_else(|| f.module.clone())
            .unwrap_or_default();
        let name = if f.python {
            f.function.clone()
        } else {
            match &f.module {
                Some(m) if f.file.is_none() => format!("{} [{m}]", f.function),
                _ => f.function.clone(),
            }
        };
        let key = (name.clone(), file.clone());
        let function_id = match self.function_ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.functions.len() as u64 + 1;
                let (n, fl) = (self.string(&name), self.string(&file));
                self.functions.push(proto::Function {
                    id,
                    name: n,
                    // pprof demangles system names, and `<module>` demangles to nothing:
                    // Python names are not mangled.
                    system_name: if f.python { 0 } else { n },
                    filename: fl,
                });
                self.function_ids.insert(key, id);
                id
            }
        };
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location {
            id,
            line: vec![proto::Line {
                function_id,
                line: f.line.unwrap_or(0) as i64,
            }],
        });
        self.location_ids.insert(f.clone(), id);
        id
    }
}

/// The gzipped profile of report `r` (every site it holds).
pub fn profile(r: &Report, all: bool, started_unix_s: f64) -> Vec<u8> {
    let mut t = Tables::new();
    let types = [
        ("inuse_space", "bytes"),
        ("inuse_objects", "count"),
        ("alloc_space", "bytes"),
        ("alloc_objects", "count"),
    ];
    let sample_type: Vec<proto::ValueType> = types
        .iter()
        .map(|(ty, unit)| proto::ValueType {
            r#type: t.string(ty),
            unit: t.string(unit),
        })
        .collect();
    let (verdict_key, allocator_key) = (t.string("verdict"), t.string("allocator"));
    let mut samples = Vec::new();
    for s in &r.sites {
        // pprof lists a sample's locations leaf first. The allocator is a label, as in Go's
        // heap profiles: the leaf is the function that allocated, and `-top` names it.
        let mut frames = shown(s, all);
        if frames.len() > 1 {
            frames.pop();
        }
        let location_id: Vec<u64> = frames.iter().rev().map(|f| t.location(f)).collect();
        let label = vec![
            proto::Label {
                key: verdict_key,
                str: t.string(s.analysis.class.name()),
            },
            proto::Label {
                key: allocator_key,
                str: t.string(&s.allocator),
            },
        ];
        samples.push(proto::Sample {
            location_id,
            value: vec![
                s.unfreed_bytes as i64,
                s.unfreed_count as i64,
                s.alloc_bytes as i64,
                s.allocs as i64,
            ],
            label,
        });
    }
    let comment = vec![t.string(&format!(
        "leaktrace {} mode, pid {} ({}); {}",
        r.mode, r.target.pid, r.target.command, r.target.end
    ))];
    let default_sample_type = t.string("inuse_space");
    let p = proto::Profile {
        sample_type,
        sample: samples,
        location: t.locations,
        function: t.functions,
        string_table: t.strings,
        time_nanos: (started_unix_s * 1e9) as i64,
        duration_nanos: (r.duration_s * 1e9) as i64,
        comment,
        default_sample_type,
    };
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&p.encode_to_vec()).expect("writing to memory");
    gz.finish().expect("writing to memory")
}
