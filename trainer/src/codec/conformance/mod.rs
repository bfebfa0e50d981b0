//! Conformance vectors (`docs/vectors/`): updates, refusals and outer steps in files any
//! language can read, so a second implementation can check itself against this one bit
//! for bit.
//!
//! The files are generated here, and generating them asserts what each one shows (a
//! valid update decodes, an invalid one is refused for its rule). The tests check that
//! the files on disk are exactly what this build generates, so they cannot go stale, and
//! that `docs/vectors/check.py`, a decoder and outer step written from the page alone in
//! Python's standard library, agrees with every one. After a deliberate change:
//! `STARLING_WRITE_VECTORS=1 cargo test -p starling-trainer conformance` rewrites them.

mod build;
mod invalid;
mod outer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{CodecConfig, Compressor, EncodedTensor, Finite, Update, ValueBits, numel_of};
use build::{Chunk, Container, Record};
use invalid::{invalid, refused_by_run};
use outer::outer_steps;

/// Generated files by path relative to the vectors directory.
type Files = BTreeMap<String, Vec<u8>>;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vectors")
}

fn hex(v: f32) -> String {
    format!("{:08x}", v.to_bits())
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("json");
    s.push('\n');
    s.into_bytes()
}

/// Deterministic values on a 1/256 grid in [-4, 4): exact ties and zeros occur.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 2048) as f32 - 1024.0) / 256.0
        })
        .collect()
}

fn config(chunk: u32, k: u32, bits: u8) -> CodecConfig {
    CodecConfig::new(chunk, k, ValueBits::try_from(bits).expect("bits")).expect("config")
}

/// One encoded tensor of pseudo-random values (scaled by `scale`), from a fresh
/// error-feedback buffer.
fn compress(
    config: CodecConfig,
    name: &str,
    shape: &[u64],
    seed: u64,
    scale: f32,
) -> EncodedTensor {
    let n = numel_of(shape).expect("shape");
    let delta: Vec<f32> = pseudo_random(n, seed).iter().map(|v| v * scale).collect();
    let mut ef = vec![0.0; n];
    Compressor::new(config, 0.9)
        .expect("compressor")
        .compress(name, shape, Finite::new(&delta).expect("finite"), &mut ef)
        .expect("compress")
}

/// The page's worked example: chunk 8, k 2, 2-bit values, one tensor `w` of 8 entries;
/// `lo` 1.0, `hi` 2.0, positions 1 and 4 (gaps 1 and 2, Rice parameter 1), codes `01`
/// (+1.75) and `10` (−1.25).
fn worked_chunk() -> Chunk {
    Chunk {
        lo: 0x3f80,
        hi: 0x4000,
        rice: 1,
        gaps: vec![1, 2],
        codes: vec![0b01, 0b10],
    }
}

fn worked_example() -> Container {
    let record = Record::new("w", &[8], vec![worked_chunk().segment(2)]);
    Container::new(8, 2, 2, vec![record])
}

/// Every kept entry of every tensor: positions (row-major) and values as binary32 bits.
fn decoded(update: &Update) -> Value {
    let c = update.config();
    let tensors: Vec<Value> = update
        .tensors()
        .iter()
        .map(|t| {
            let (mut positions, mut values) = (vec![], vec![]);
            t.for_each_entry(|at, v| {
                positions.push(at);
                values.push(hex(v));
            })
            .expect("valid");
            json!({"name": t.name(), "shape": t.shape(), "positions": positions, "values": values})
        })
        .collect();
    json!({"chunk": c.chunk(), "k": c.k(), "bits": c.value_bits().bits(), "tensors": tensors})
}

fn valid(files: &mut Files) -> Vec<Value> {
    let two = config(64, 4, 2);
    let four = config(8, 2, 4);
    let eight = config(4, 2, 8);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "worked-example",
            "the page's worked example, made by hand field by field",
            worked_example().to_bytes(),
        ),
        (
            "two-bit-tails",
            "2-bit values, Rice parameter 3, a short last chunk, a scalar (ndim 0), \
             zero-size tensors including dims [0, 2^32, 2^32]",
            Update::new(
                two,
                vec![
                    compress(two, "layers.0.weight", &[3, 50], 1, 1.0),
                    compress(two, "norm", &[], 2, 1.0),
                    compress(two, "empty", &[0, 7], 3, 1.0),
                    compress(two, "wide.empty", &[0, 1 << 32, 1 << 32], 4, 1.0),
                ],
            )
            .expect("update")
            .to_bytes(),
        ),
        (
            "four-bit-segments",
            "4-bit values, three segments (256 + 256 + 13 chunks), a short last chunk",
            Update::new(four, vec![compress(four, "w", &[2, 2100], 5, 1.0)])
                .expect("update")
                .to_bytes(),
        ),
        (
            "eight-bit-rice-zero",
            "8-bit values, Rice parameter 0, short last chunks, a non-ASCII name",
            Update::new(
                eight,
                vec![
                    compress(eight, "embed.ψ", &[5, 3], 6, 1.0),
                    compress(eight, "v", &[4], 7, 1.0),
                ],
            )
            .expect("update")
            .to_bytes(),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, covers, bytes)| {
            let update = Update::from_bytes(&bytes).expect("a valid vector decodes");
            let (file, expected) = (format!("valid/{name}.slco"), format!("valid/{name}.json"));
            files.insert(file.clone(), bytes);
            files.insert(expected.clone(), pretty(&decoded(&update)));
            json!({"name": name, "covers": covers, "update": file, "decoded": expected})
        })
        .collect()
}

/// Every vector file, including `index.json`.
fn generate() -> Files {
    let mut files = Files::new();
    let index = json!({
        "format": 1,
        "valid": valid(&mut files),
        "invalid": invalid(&mut files),
        "refused_by_run": refused_by_run(&mut files),
        "outer_steps": outer_steps(&mut files),
    });
    files.insert("index.json".into(), pretty(&index));
    files
}

/// Generated files under `dir`, by relative path (the checker and README are not).
fn on_disk(dir: &Path) -> Files {
    let mut found = Files::new();
    for sub in ["", "valid", "invalid", "refused-by-run", "outer"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            let ext = path.extension().and_then(|e| e.to_str());
            if matches!(ext, Some("json" | "slco")) {
                let rel = path.strip_prefix(dir).expect("under dir");
                let rel = rel.to_str().expect("utf-8").replace('\\', "/");
                found.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    found
}

#[test]
fn the_vectors_on_disk_are_what_this_build_generates() {
    let generated = generate();
    if std::env::var_os("STARLING_WRITE_VECTORS").is_some() {
        for (rel, bytes) in &generated {
            let path = dir().join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, bytes).expect("write");
        }
    }
    let disk = on_disk(&dir());
    let names = |f: &Files| f.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&disk),
        names(&generated),
        "STARLING_WRITE_VECTORS=1 regenerates them"
    );
    for (rel, bytes) in &generated {
        assert!(
            disk[rel] == *bytes,
            "{rel} differs from what this build generates"
        );
    }
}

#[test]
fn the_worked_example_decodes_to_the_values_the_page_gives() {
    let bytes = worked_example().to_bytes();
    assert_eq!(bytes.len(), 50);
    assert_eq!(bytes[40..46], [0x80, 0x3f, 0x00, 0x40, 0x2b, 0x01]);
    let update = Update::from_bytes(&bytes).unwrap();
    let mut dense = vec![0.0; 8];
    update.tensors()[0].decode_add(1.0, &mut dense).unwrap();
    assert_eq!(dense, [0.0, 1.75, 0.0, 0.0, -1.25, 0.0, 0.0, 0.0]);
}

#[test]
fn a_decoder_written_from_the_page_in_python_agrees_with_every_vector() {
    let python = std::env::var_os("STARLING_PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(python)
        .arg(dir().join("check.py"))
        .arg(dir())
        .output()
        .expect("python3 runs (the checker needs only its standard library)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("every vector agrees"), "{text}");
}
