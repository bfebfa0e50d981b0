//! Updates every decoder must refuse, each breaking one rule, and well-formed updates a
//! run must refuse because they are not made for it.

use serde_json::{Value, json};

use super::build::{Chunk, Container, Record};
use super::{Files, config, worked_chunk, worked_example};
use crate::codec::{CodecConfig, Update};

/// The worked example with one change.
fn broken(change: impl FnOnce(&mut Container)) -> Vec<u8> {
    let mut c = worked_example();
    change(&mut c);
    c.to_bytes()
}

/// The worked example whose chunk has one change.
fn broken_chunk(change: impl FnOnce(&mut Chunk)) -> Vec<u8> {
    let mut chunk = worked_chunk();
    change(&mut chunk);
    broken(|c| c.records[0].segments = vec![chunk.segment(2)])
}

fn broken_segment(change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut segment = worked_chunk().segment(2);
    change(&mut segment);
    broken(|c| c.records[0].segments = vec![segment])
}

/// An invalid vector: its name, the rule it breaks, the reference decoder's message.
type Case = (&'static str, &'static str, &'static str, Vec<u8>);

pub fn invalid(files: &mut Files) -> Vec<Value> {
    let cases = [header_cases(), record_cases(), chunk_cases()].concat();
    cases
        .into_iter()
        .map(|(name, rule, error, bytes)| {
            let e = Update::from_bytes(&bytes).expect_err(name).to_string();
            assert!(e.contains(error), "{name}: {e}");
            let file = format!("invalid/{name}.slco");
            files.insert(file.clone(), bytes);
            json!({"name": name, "rule": rule, "update": file, "error": error})
        })
        .collect()
}

/// Breaking a rule of the container header or its checksum.
fn header_cases() -> Vec<Case> {
    let good = worked_example().to_bytes();
    let mut bad_crc = good.clone();
    *bad_crc.last_mut().expect("bytes") ^= 1;
    vec![
        (
            "bad-magic",
            "the first 4 bytes are not `SLCO`",
            "bad magic",
            broken(|c| c.magic = *b"SLCX"),
        ),
        (
            "too-short",
            "fewer than 28 bytes",
            "truncated",
            good[..27].to_vec(),
        ),
        (
            "unknown-version",
            "a version other than 1",
            "unsupported wire version 2",
            broken(|c| c.version = 2),
        ),
        (
            "checksum",
            "the CRC-32 does not match",
            "checksum mismatch",
            bad_crc,
        ),
        (
            "value-bits",
            "value_bits not 2, 4 or 8",
            "value bits must be",
            broken(|c| c.bits = 3),
        ),
        (
            "flags",
            "flags not 0",
            "unknown flags",
            broken(|c| c.flags = 1),
        ),
        (
            "chunk-zero",
            "chunk 0",
            "chunk must be in",
            broken(|c| c.chunk = 0),
        ),
        (
            "chunk-too-large",
            "chunk above 2^20",
            "chunk must be in",
            broken(|c| c.chunk = (1 << 20) + 1),
        ),
        ("k-zero", "k 0", "k must be in", broken(|c| c.k = 0)),
        (
            "k-above-chunk",
            "k above chunk",
            "k must be in",
            broken(|c| c.k = 9),
        ),
        (
            "segment-chunks",
            "segment_chunks not 256",
            "unsupported segment size",
            broken(|c| c.segment_chunks = 128),
        ),
    ]
}

/// Breaking a rule of the tensor records.
fn record_cases() -> Vec<Case> {
    vec![
        (
            "tensor-count",
            "tensor_count larger than the records present",
            "truncated",
            broken(|c| c.count = Some(2)),
        ),
        (
            "name-empty",
            "name_len 0",
            "tensor name length",
            broken(|c| c.records[0].name.clear()),
        ),
        (
            "name-too-long",
            "name_len above 1024",
            "tensor name length",
            broken(|c| c.records[0].name = vec![b'a'; 1025]),
        ),
        (
            "name-not-utf8",
            "a name that is not UTF-8",
            "not UTF-8",
            broken(|c| c.records[0].name = vec![0xff]),
        ),
        (
            "name-twice",
            "two tensors with one name",
            "appears more than once",
            broken(|c| c.records.push(c.records[0].clone())),
        ),
        (
            "rank-9",
            "ndim above 8",
            "tensor rank",
            broken(|c| c.records[0].dims = vec![1; 9]),
        ),
        (
            "element-count-overflow",
            "the running product of the dims overflows u64 (dims [2^32, 2^32, 0])",
            "tensor size",
            broken(|c| {
                c.records[0].dims = vec![1 << 32, 1 << 32, 0];
                c.records[0].segments.clear();
            }),
        ),
        (
            "element-count-limit",
            "N above 2^40 (dims [2^20, 2^20, 2])",
            "tensor size",
            broken(|c| {
                c.records[0].dims = vec![1 << 20, 1 << 20, 2];
                c.records[0].segments.clear();
            }),
        ),
        (
            "trailing-bytes",
            "bytes after the last tensor record",
            "trailing bytes",
            broken(|c| c.trailing = vec![0]),
        ),
    ]
}

/// Breaking a rule inside a segment or chunk.
fn chunk_cases() -> Vec<Case> {
    vec![
        (
            "segment-too-long",
            "a segment longer than ⌈bits used / 8⌉",
            "segment length disagrees",
            broken_segment(|s| s.push(0)),
        ),
        (
            "segment-too-short",
            "a chunk runs past the end of its segment",
            "truncated",
            broken_segment(|s| s.truncate(5)),
        ),
        (
            "padding",
            "a padding bit is 1",
            "non-zero padding",
            broken_segment(|s| s[5] |= 0x80),
        ),
        (
            "scales-reversed",
            "lo above hi",
            "scales not ordered",
            broken_chunk(|c| (c.lo, c.hi) = (0x4000, 0x3f80)),
        ),
        (
            "scale-negative-zero",
            "a scale with its sign bit set, even −0",
            "scales not ordered",
            broken_chunk(|c| c.lo = 0x8000),
        ),
        (
            "scale-infinite",
            "hi infinite",
            "non-finite scale",
            broken_chunk(|c| c.hi = 0x7f80),
        ),
        (
            "scale-nan",
            "lo NaN",
            "non-finite scale",
            broken_chunk(|c| c.lo = 0x7fc1),
        ),
        (
            "position-outside-chunk",
            "a position at or past the chunk's length",
            "index outside its chunk",
            broken_chunk(|c| c.gaps = vec![1, 6]),
        ),
        (
            "rice-quotient",
            "a Rice quotient above (L >> r) + 1",
            "index gap out of range",
            broken_chunk(|c| c.gaps = vec![1, 12]),
        ),
    ]
}

/// A run's settings and tensors, as a vector's JSON gives them.
pub fn run_json(config: CodecConfig, tensors: &[(&str, &[u64])]) -> Value {
    let tensors: Vec<Value> = tensors
        .iter()
        .map(|(name, shape)| json!({"name": name, "shape": shape}))
        .collect();
    json!({"chunk": config.chunk(), "k": config.k(), "bits": config.value_bits().bits(), "tensors": tensors})
}

/// Whether a run with `run`'s settings and tensors applies `update`, as the exchange
/// decides it.
fn run_accepts(run: &Value, update: &Update) -> Result<(), String> {
    let n = |key: &str| run[key].as_u64().expect("number") as u32;
    let ours = config(n("chunk"), n("k"), n("bits") as u8);
    let layout: Vec<(String, Vec<u64>)> = run["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| {
            let shape = t["shape"].as_array().expect("shape").iter();
            let shape = shape.map(|d| d.as_u64().expect("dim")).collect();
            (t["name"].as_str().expect("name").to_owned(), shape)
        })
        .collect();
    update
        .check_fits(ours, layout.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .map_err(|e| e.to_string())
}

pub fn refused_by_run(files: &mut Files) -> Vec<Value> {
    let run = config(8, 2, 2);
    let w: &[u64] = &[8];
    let four_bit = Chunk {
        codes: vec![0b0011, 0b1000],
        ..worked_chunk()
    };
    let record = |name: &str| Record::new(name, &[8], vec![worked_chunk().segment(2)]);
    let cases: Vec<(&str, &str, &str, Vec<u8>, Value)> = vec![
        (
            "config-mismatch",
            "value bits (or chunk, or k) other than the run's",
            "this run uses chunk 8 / k 2 / 2-bit values",
            Container::new(
                8,
                2,
                4,
                vec![Record::new("w", &[8], vec![four_bit.segment(4)])],
            )
            .to_bytes(),
            run_json(run, &[("w", w)]),
        ),
        (
            "missing-tensor",
            "a tensor of the model is absent",
            "tensor v is missing",
            worked_example().to_bytes(),
            run_json(run, &[("w", w), ("v", w)]),
        ),
        (
            "unexpected-tensor",
            "a tensor the model does not have",
            "tensor x is not part of the model",
            Container::new(8, 2, 2, vec![record("w"), record("x")]).to_bytes(),
            run_json(run, &[("w", w)]),
        ),
        (
            "shape-mismatch",
            "a tensor in another shape than the model's, even with as many entries",
            "disagrees with the model's",
            worked_example().to_bytes(),
            run_json(run, &[("w", &[2, 4])]),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, rule, error, bytes, run)| {
            let update = Update::from_bytes(&bytes).expect("well-formed");
            let e = run_accepts(&run, &update).expect_err(name);
            assert!(e.contains(error), "{name}: {e}");
            let file = format!("refused-by-run/{name}.slco");
            files.insert(file.clone(), bytes);
            json!({"name": name, "rule": rule, "update": file, "run": run, "error": error})
        })
        .collect()
}
