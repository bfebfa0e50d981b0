//! SparseLoCo codec: error feedback, chunked top-k, low-bit values and compact indices.
//!
//! Each peer keeps an error-feedback buffer `e` per tensor. For a pseudo-gradient `Δ`:
//!
//! 1. `e ← β·e + Δ` (the decayed accumulator stands in for outer momentum);
//! 2. the tensor, flattened row-major, is cut into chunks of `chunk` consecutive entries
//!    (the last one may be shorter); in each chunk the `k` entries of largest `|e|` are
//!    kept (a short tail keeps the same density, rounded up, at least one);
//! 3. kept values are quantised to `bits` (see below) and their positions Rice-coded;
//! 4. `e ← e − decode(C)`: what was not sent, including the quantisation residual, stays
//!    in `e` for the next round.
//!
//! # Quantisation: bounded, deterministic
//!
//! A value is sent as a sign bit and a `bits − 1`-bit magnitude code. With `lo ≤ hi` the
//! chunk's smallest and largest kept magnitudes (rounded outward to bf16, so every kept
//! magnitude lies in `[lo, hi]`) and `L = 2^(bits−1)` levels of width `s = (hi − lo)/L`,
//! magnitude `m` gets code `c = min(⌊(m − lo)/s⌋, L − 1)` and decodes to the bin midpoint
//! `lo + (c + ½)·s`. Hence
//!
//! ```text
//! |m − decode(m)| ≤ s/2 = (hi − lo) / 2^bits
//! ```
//!
//! We chose a bounded, deterministic quantiser over an unbiased stochastic one because
//! error feedback already removes bias over rounds (the residual is carried, not lost),
//! a deterministic rule has lower variance, and it keeps every peer's encoding a pure
//! function of its inputs, which scoring and replay rely on.
//!
//! The wire layout is specified in `trainer/docs/wire-format.md`.

mod aggregate;
mod bits;
mod chunk;
mod wire;

use std::fmt;

use rayon::prelude::*;

pub use aggregate::{AggregationRule, aggregate, outer_step};
pub(crate) use aggregate::{clip_factor, median};
pub use wire::{Update, WIRE_VERSION};

use bits::{BitReader, BitWriter};

/// Chunks per independently decodable segment. Segments are byte-aligned and listed with
/// their lengths, so encoding and decoding run in parallel over them.
pub const SEGMENT_CHUNKS: usize = 256;
/// Largest supported chunk: a Rice quotient must fit the reader's bounds.
pub const MAX_CHUNK: u32 = 1 << 20;

/// Bits per transmitted value: 2, 4 or 8. In a TrainingRun and on the wire it is the
/// number itself.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub enum ValueBits {
    #[default]
    Two,
    Four,
    Eight,
}

impl From<ValueBits> for u8 {
    fn from(bits: ValueBits) -> u8 {
        bits.bits()
    }
}

impl schemars::JsonSchema for ValueBits {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ValueBits".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "integer",
            "enum": [2, 4, 8],
            "default": 2,
            "description": "Bits per transmitted value."
        })
    }
}

impl ValueBits {
    pub fn bits(self) -> u8 {
        match self {
            ValueBits::Two => 2,
            ValueBits::Four => 4,
            ValueBits::Eight => 8,
        }
    }
}

impl TryFrom<u8> for ValueBits {
    type Error = CodecError;

    fn try_from(bits: u8) -> Result<Self, CodecError> {
        match bits {
            2 => Ok(ValueBits::Two),
            4 => Ok(ValueBits::Four),
            8 => Ok(ValueBits::Eight),
            _ => Err(CodecError::InvalidConfig(format!(
                "value bits must be 2, 4 or 8, not {bits}"
            ))),
        }
    }
}

/// What an encoding's reader needs to know: chunking, entries per chunk, value width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodecConfig {
    chunk: u32,
    k: u32,
    bits: ValueBits,
}

impl std::fmt::Display for CodecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (chunk, k, bits) = (self.chunk, self.k, self.bits.bits());
        write!(f, "chunk {chunk} / k {k} / {bits}-bit values")
    }
}

impl CodecConfig {
    pub fn new(chunk: u32, k: u32, bits: ValueBits) -> Result<Self, CodecError> {
        if !(1..=MAX_CHUNK).contains(&chunk) {
            return Err(CodecError::InvalidConfig(format!(
                "chunk must be in 1..={MAX_CHUNK}, not {chunk}"
            )));
        }
        if !(1..=chunk).contains(&k) {
            return Err(CodecError::InvalidConfig(format!(
                "k must be in 1..=chunk ({chunk}), not {k}"
            )));
        }
        Ok(Self { chunk, k, bits })
    }

    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    pub fn k(&self) -> u32 {
        self.k
    }

    pub fn value_bits(&self) -> ValueBits {
        self.bits
    }

    fn segment_len(&self) -> usize {
        self.chunk as usize * SEGMENT_CHUNKS
    }

    /// `(chunk length, kept)` for every chunk of a tensor of `numel` entries starting at
    /// `start`, up to one segment.
    fn chunks_from(&self, start: usize, numel: usize) -> impl Iterator<Item = (usize, usize)> {
        let chunk = self.chunk as usize;
        let end = numel.min(start + self.segment_len());
        (start..end).step_by(chunk).map(move |at| {
            let len = chunk.min(end - at);
            (len, chunk::k_for(len, chunk, self.k as usize))
        })
    }

    /// Bits a fixed-width index code would spend on a tensor (`⌈log2 len⌉` per index):
    /// the baseline compact index coding is measured against.
    pub fn fixed_index_bits(&self, numel: usize) -> u64 {
        (0..numel)
            .step_by(self.segment_len().max(1))
            .flat_map(|s| self.chunks_from(s, numel))
            .map(|(len, k)| k as u64 * u64::from(usize::BITS - (len - 1).leading_zeros()))
            .sum()
    }
}

/// Compresses pseudo-gradients tensor by tensor, with error feedback.
#[derive(Clone, Debug)]
pub struct Compressor {
    config: CodecConfig,
    beta: f32,
}

impl Compressor {
    /// `beta` is the error-feedback decay β in `e ← β·e + Δ`.
    pub fn new(config: CodecConfig, beta: f32) -> Result<Self, CodecError> {
        if !(0.0..=1.0).contains(&beta) {
            return Err(CodecError::InvalidConfig(format!(
                "error-feedback decay must be in [0, 1], not {beta}"
            )));
        }
        Ok(Self { config, beta })
    }

    pub fn config(&self) -> CodecConfig {
        self.config
    }

    /// Compresses one tensor's pseudo-gradient `delta` (row-major, `shape`) and updates its
    /// error-feedback buffer `ef` in place.
    ///
    /// `delta` is [`Finite`], checked where it was produced, so a diverged step is refused
    /// before it can touch `ef`.
    pub fn compress(
        &self,
        name: &str,
        shape: &[u64],
        delta: Finite<'_>,
        ef: &mut [f32],
    ) -> Result<EncodedTensor, CodecError> {
        let delta = delta.0;
        if name.is_empty() || name.len() > wire::MAX_NAME_LEN {
            return Err(CodecError::InvalidConfig(format!(
                "tensor names must be 1 to {} bytes: {name:?}",
                wire::MAX_NAME_LEN
            )));
        }
        let numel = numel_of(shape).ok_or(CodecError::TooLarge("tensor shape"))?;
        for (what, len) in [("delta", delta.len()), ("error feedback", ef.len())] {
            if len != numel {
                return Err(CodecError::LengthMismatch {
                    tensor: format!("{name} ({what})"),
                    expected: numel,
                    found: len,
                });
            }
        }
        let seg = self.config.segment_len();
        let (chunk, k, bits, beta) = (
            self.config.chunk as usize,
            self.config.k as usize,
            self.config.bits,
            self.beta,
        );
        let encoded: Vec<Result<(Vec<u8>, u64), CodecError>> = ef
            .par_chunks_mut(seg)
            .zip(delta.par_chunks(seg))
            .map_init(
                || chunk::Scratch::new(chunk),
                |scratch, (e, d)| {
                    let mut out = Vec::with_capacity(estimate_bytes(e.len(), chunk, k, bits));
                    let mut w = BitWriter::new(&mut out);
                    let mut index_bits = 0;
                    for start in (0..d.len()).step_by(chunk) {
                        let end = (start + chunk).min(d.len());
                        let p = chunk::ChunkParams {
                            beta,
                            k: chunk::k_for(end - start, chunk, k),
                            bits,
                        };
                        let (e, d) = (&mut e[start..end], &d[start..end]);
                        index_bits += chunk::encode(e, d, p, scratch, &mut w)?;
                    }
                    w.finish();
                    Ok((out, index_bits))
                },
            )
            .collect();

        let mut payload = Vec::with_capacity(encoded.iter().flatten().map(|s| s.0.len()).sum());
        let mut segment_ends = Vec::with_capacity(encoded.len());
        let mut index_bits = 0;
        for segment in encoded {
            let (bytes, bits) = segment.map_err(|e| e.in_tensor(name))?;
            payload.extend_from_slice(&bytes);
            segment_ends.push(payload.len());
            index_bits += bits;
        }
        Ok(EncodedTensor {
            name: name.to_owned(),
            shape: shape.to_vec(),
            config: self.config,
            payload,
            segment_ends,
            index_bits,
        })
    }
}

fn estimate_bytes(len: usize, chunk: usize, k: usize, bits: ValueBits) -> usize {
    let chunks = len.div_ceil(chunk);
    // scales + ~9 bits per index + values, per chunk
    chunks * (4 + (k * (9 + usize::from(bits.bits()))).div_ceil(8)) + 8
}

/// A slice known to hold only finite values: the codec's input contract.
///
/// Checking is fused into the pass that produces the values ([`Finite::pseudo_gradient`])
/// so it costs no extra trip through memory; [`Finite::new`] checks an existing slice.
#[derive(Clone, Copy, Debug)]
pub struct Finite<'a>(&'a [f32]);

const CHECK_BLOCK: usize = 1 << 16;

impl<'a> Finite<'a> {
    /// Checks every value; the error gives the first non-finite index.
    pub fn new(values: &'a [f32]) -> Result<Self, CodecError> {
        let bad = values
            .par_chunks(CHECK_BLOCK)
            .position_first(|b| b.iter().fold(false, |bad, v| bad | !v.is_finite()));
        match bad {
            None => Ok(Self(values)),
            Some(block) => Err(first_non_finite_error(values, block)),
        }
    }

    /// Computes the pseudo-gradient `out = global − local` and checks it in the same pass.
    pub fn pseudo_gradient(
        global: &[f32],
        local: &[f32],
        out: &'a mut [f32],
    ) -> Result<Self, CodecError> {
        if global.len() != out.len() || local.len() != out.len() {
            return Err(CodecError::LengthMismatch {
                tensor: "pseudo-gradient".into(),
                expected: out.len(),
                found: global.len().min(local.len()),
            });
        }
        let bad = out
            .par_chunks_mut(CHECK_BLOCK)
            .zip(
                global
                    .par_chunks(CHECK_BLOCK)
                    .zip(local.par_chunks(CHECK_BLOCK)),
            )
            .map(|(o, (g, l))| {
                let mut bad = false;
                for (o, (g, l)) in o.iter_mut().zip(g.iter().zip(l)) {
                    *o = g - l;
                    bad |= !o.is_finite();
                }
                bad
            })
            .position_first(|bad| bad);
        match bad {
            None => Ok(Self(out)),
            Some(block) => Err(first_non_finite_error(out, block)),
        }
    }

    pub fn as_slice(&self) -> &'a [f32] {
        self.0
    }
}

fn first_non_finite_error(values: &[f32], block: usize) -> CodecError {
    let start = block * CHECK_BLOCK;
    let offset = values[start..].iter().position(|v| !v.is_finite());
    CodecError::NonFinite {
        index: start + offset.unwrap_or(0),
    }
}

/// Element count of a shape, if it is sane (at most 8 dims and 2^40 entries).
pub(crate) fn numel_of(shape: &[u64]) -> Option<usize> {
    if shape.len() > 8 {
        return None;
    }
    shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= 1 << 40)
        .and_then(|n| usize::try_from(n).ok())
}

/// One tensor's compressed update. Only [`Compressor::compress`] and [`Update::from_bytes`]
/// (which validates every field) make one, so decoding it never meets malformed data.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedTensor {
    name: String,
    shape: Vec<u64>,
    config: CodecConfig,
    payload: Vec<u8>,
    /// End offset of each segment in `payload`.
    segment_ends: Vec<usize>,
    /// Bits spent on Rice-coded indices (encoder-side statistic; 0 after parsing).
    index_bits: u64,
}

impl fmt::Debug for EncodedTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedTensor")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("config", &self.config)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

impl EncodedTensor {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    pub fn config(&self) -> CodecConfig {
        self.config
    }

    pub fn numel(&self) -> usize {
        numel_of(&self.shape).expect("validated at construction")
    }

    /// Payload bytes (without the container's per-tensor header).
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// Bits the encoder spent on indices.
    pub fn index_bits(&self) -> u64 {
        self.index_bits
    }

    fn segments(&self) -> impl IndexedParallelIterator<Item = (usize, &[u8])> {
        (0..self.segment_ends.len()).into_par_iter().map(|i| {
            let start = if i == 0 { 0 } else { self.segment_ends[i - 1] };
            (i, &self.payload[start..self.segment_ends[i]])
        })
    }

    /// Decodes one segment, calling `sink(position in tensor, value)` for each kept entry.
    fn decode_segment(
        &self,
        index: usize,
        bytes: &[u8],
        mut sink: impl FnMut(usize, f32),
    ) -> Result<(), CodecError> {
        let numel = self.numel();
        let start = index * self.config.segment_len();
        let mut r = BitReader::new(bytes);
        let mut positions = Vec::with_capacity(self.config.k as usize);
        let mut at = start;
        for (c, (len, k)) in self.config.chunks_from(start, numel).enumerate() {
            chunk::decode(&mut r, len, k, self.config.bits, &mut positions, |i, v| {
                sink(at + i, v)
            })
            .map_err(|e| e.at(&self.name, index * SEGMENT_CHUNKS + c))?;
            at += len;
        }
        if r.position().div_ceil(8) != bytes.len() {
            return Err(
                CodecError::Corrupt("segment length disagrees with its content")
                    .at(&self.name, index * SEGMENT_CHUNKS),
            );
        }
        if !r.rest_is_zero() {
            return Err(
                CodecError::Corrupt("non-zero padding after a segment's last chunk")
                    .at(&self.name, index * SEGMENT_CHUNKS),
            );
        }
        Ok(())
    }

    /// Checks every chunk (used on parse; a compressed tensor is valid by construction).
    fn validate(&self) -> Result<(), CodecError> {
        let expected = self.numel().div_ceil(self.config.segment_len());
        if self.segment_ends.len() != expected {
            return Err(CodecError::Corrupt("wrong number of segments").in_tensor(&self.name));
        }
        self.segments()
            .try_for_each(|(i, bytes)| self.decode_segment(i, bytes, |_, _| {}))
    }

    /// `out += weight · decode(self)`. `out` is the dense tensor (row-major).
    pub fn decode_add(&self, weight: f32, out: &mut [f32]) -> Result<(), CodecError> {
        self.check_len(out.len())?;
        let seg = self.config.segment_len();
        out.par_chunks_mut(seg)
            .zip(self.segments())
            .try_for_each(|(out, (i, bytes))| {
                let base = i * seg;
                self.decode_segment(i, bytes, |at, v| out[at - base] += weight * v)
            })
    }

    /// Calls `f(position, value)` for every kept entry, in ascending position.
    pub fn for_each_entry(&self, mut f: impl FnMut(usize, f32)) -> Result<(), CodecError> {
        for i in 0..self.segment_ends.len() {
            let start = if i == 0 { 0 } else { self.segment_ends[i - 1] };
            self.decode_segment(i, &self.payload[start..self.segment_ends[i]], &mut f)?;
        }
        Ok(())
    }

    /// L2 norm of the decoded tensor.
    pub fn norm(&self) -> Result<f64, CodecError> {
        let partial: Result<Vec<f64>, CodecError> = self
            .segments()
            .map(|(i, bytes)| {
                let mut sum = 0.0f64;
                self.decode_segment(i, bytes, |_, v| sum += f64::from(v) * f64::from(v))?;
                Ok(sum)
            })
            .collect();
        Ok(partial?.iter().sum::<f64>().sqrt())
    }

    fn check_len(&self, len: usize) -> Result<(), CodecError> {
        if len == self.numel() {
            Ok(())
        } else {
            Err(CodecError::LengthMismatch {
                tensor: self.name.clone(),
                expected: self.numel(),
                found: len,
            })
        }
    }
}

/// Everything that can go wrong compressing, parsing or decoding an update.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CodecError {
    #[error("invalid codec config: {0}")]
    InvalidConfig(String),
    #[error("non-finite value at index {index}")]
    NonFinite { index: usize },
    #[error("error feedback overflowed to a non-finite value; reset it")]
    Overflow,
    #[error("tensor {tensor}: expected {expected} entries, got {found}")]
    LengthMismatch {
        tensor: String,
        expected: usize,
        found: usize,
    },
    #[error("not a Starling update (bad magic)")]
    BadMagic,
    #[error("unsupported wire version {0} (this build reads {WIRE_VERSION})")]
    UnsupportedVersion(u16),
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("update truncated")]
    Truncated,
    #[error("{0} exceeds the supported limit")]
    TooLarge(&'static str),
    #[error("corrupt update: {0}")]
    Corrupt(&'static str),
    #[error("tensor {tensor}, chunk {chunk}: {source}")]
    InChunk {
        tensor: String,
        chunk: usize,
        source: Box<CodecError>,
    },
    #[error("tensor {tensor}: {source}")]
    InTensor {
        tensor: String,
        source: Box<CodecError>,
    },
    #[error("tensor {0} appears more than once")]
    DuplicateTensor(String),
    #[error("tensor {0} is missing from the update")]
    MissingTensor(String),
    #[error("tensor {0} is not part of the model")]
    UnexpectedTensor(String),
    #[error("tensor {tensor}: shape {found:?} disagrees with the model's {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("the update is encoded with {found}; this run uses {expected}")]
    ConfigMismatch {
        expected: CodecConfig,
        found: CodecConfig,
    },
}

impl CodecError {
    fn at(self, tensor: &str, chunk: usize) -> Self {
        CodecError::InChunk {
            tensor: tensor.to_owned(),
            chunk,
            source: Box::new(self),
        }
    }

    /// Names the tensor an error concerns (unless it already names one).
    pub fn in_tensor(self, tensor: &str) -> Self {
        match self {
            e @ (CodecError::InChunk { .. } | CodecError::InTensor { .. }) => e,
            e => CodecError::InTensor {
                tensor: tensor.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
