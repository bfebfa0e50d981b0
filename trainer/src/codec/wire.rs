//! The update container: header, tensors, checksum. Specified in `docs/wire-format.md`.

use std::collections::{BTreeMap, HashSet};

use super::{CodecConfig, CodecError, EncodedTensor, SEGMENT_CHUNKS, ValueBits, numel_of};

pub const MAGIC: [u8; 4] = *b"SLCO";
pub const WIRE_VERSION: u16 = 1;
const HEADER_LEN: usize = 24;
/// Smallest possible tensor record: name length, a 1-byte name, ndim.
const MIN_TENSOR_LEN: usize = 2 + 1 + 1;
pub(crate) const MAX_NAME_LEN: usize = 1024;

/// One peer's compressed update for one round: every tensor of the model, encoded with
/// one codec config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    config: CodecConfig,
    tensors: Vec<EncodedTensor>,
}

impl Update {
    /// Bundles tensors compressed with the same config; names must be unique.
    pub fn new(config: CodecConfig, tensors: Vec<EncodedTensor>) -> Result<Self, CodecError> {
        let mut seen = HashSet::new();
        for t in &tensors {
            if t.config != config {
                return Err(CodecError::ConfigMismatch {
                    expected: config,
                    found: t.config,
                });
            }
            if !seen.insert(t.name.as_str()) {
                return Err(CodecError::DuplicateTensor(t.name.clone()));
            }
        }
        Ok(Self { config, tensors })
    }

    pub fn config(&self) -> CodecConfig {
        self.config
    }

    pub fn tensors(&self) -> &[EncodedTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&EncodedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Checks the update is one a run with `config` applies to a model of `layout`:
    /// encoded with exactly the run's chunk, k and value bits (a peer choosing its own
    /// could send a nearly dense update every peer then downloads), every tensor present
    /// once in its shape, and nothing else.
    pub fn check_fits<'a>(
        &self,
        config: CodecConfig,
        layout: impl IntoIterator<Item = (&'a str, &'a [u64])>,
    ) -> Result<(), CodecError> {
        if self.config != config {
            return Err(CodecError::ConfigMismatch {
                expected: config,
                found: self.config,
            });
        }
        self.check_layout(layout)
    }

    /// Checks the update describes exactly this model: every tensor present once, with
    /// this shape, and nothing else.
    pub(crate) fn check_layout<'a>(
        &self,
        model: impl IntoIterator<Item = (&'a str, &'a [u64])>,
    ) -> Result<(), CodecError> {
        let mut have: BTreeMap<&str, &EncodedTensor> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for (name, shape) in model {
            let t = have
                .remove(name)
                .ok_or_else(|| CodecError::MissingTensor(name.to_owned()))?;
            if t.shape != shape {
                return Err(CodecError::ShapeMismatch {
                    tensor: name.to_owned(),
                    expected: shape.to_vec(),
                    found: t.shape.clone(),
                });
            }
        }
        match have.into_keys().next() {
            Some(extra) => Err(CodecError::UnexpectedTensor(extra.to_owned())),
            None => Ok(()),
        }
    }

    /// Serialises the update.
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload: usize = self
            .tensors
            .iter()
            .map(|t| {
                t.payload.len() + t.name.len() + 8 * t.shape.len() + 4 * t.segment_ends.len() + 3
            })
            .sum();
        let mut out = Vec::with_capacity(HEADER_LEN + payload + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        out.push(self.config.bits.bits());
        out.push(0); // flags
        out.extend_from_slice(&self.config.chunk.to_le_bytes());
        out.extend_from_slice(&self.config.k.to_le_bytes());
        out.extend_from_slice(&(SEGMENT_CHUNKS as u32).to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            out.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
            out.extend_from_slice(t.name.as_bytes());
            out.push(t.shape.len() as u8);
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            let mut start = 0;
            for &end in &t.segment_ends {
                out.extend_from_slice(&((end - start) as u32).to_le_bytes());
                start = end;
            }
            out.extend_from_slice(&t.payload);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and fully validates an update. Memory use is bounded by `bytes.len()`: no
    /// count or length read from the input is trusted before the input is known to hold it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(CodecError::BadMagic);
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(CodecError::Truncated);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let mut r = Reader { data: body, pos: 4 };
        let version = r.u16()?;
        if version != WIRE_VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(CodecError::Checksum { stored, computed });
        }
        let bits = ValueBits::try_from(r.u8()?)?;
        if r.u8()? != 0 {
            return Err(CodecError::Corrupt("unknown flags"));
        }
        let config = CodecConfig::new(r.u32()?, r.u32()?, bits)?;
        if r.u32()? as usize != SEGMENT_CHUNKS {
            return Err(CodecError::Corrupt("unsupported segment size"));
        }
        let count = r.u32()? as usize;
        if count > r.remaining() / MIN_TENSOR_LEN {
            return Err(CodecError::Truncated);
        }

        let mut tensors = Vec::with_capacity(count);
        let mut names = HashSet::with_capacity(count);
        for _ in 0..count {
            let name_len = r.u16()? as usize;
            if name_len == 0 || name_len > MAX_NAME_LEN {
                return Err(CodecError::Corrupt("tensor name length"));
            }
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| CodecError::Corrupt("tensor name is not UTF-8"))?
                .to_owned();
            if !names.insert(name.clone()) {
                return Err(CodecError::DuplicateTensor(name));
            }
            let ndim = r.u8()? as usize;
            if ndim > 8 {
                return Err(CodecError::TooLarge("tensor rank").in_tensor(&name));
            }
            let shape = (0..ndim).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let numel = numel_of(&shape)
                .ok_or_else(|| CodecError::TooLarge("tensor size").in_tensor(&name))?;
            let segments = numel.div_ceil(config.segment_len());
            if segments > r.remaining() / 4 {
                return Err(CodecError::Truncated);
            }
            let mut segment_ends = Vec::with_capacity(segments);
            let mut total = 0usize;
            for _ in 0..segments {
                total += r.u32()? as usize;
                segment_ends.push(total);
            }
            let payload = r.take(total)?.to_vec();
            let tensor = EncodedTensor {
                name,
                shape,
                config,
                payload,
                segment_ends,
                index_bits: 0,
            };
            tensor.validate()?;
            tensors.push(tensor);
        }
        if r.remaining() != 0 {
            return Err(CodecError::Corrupt("trailing bytes after the last tensor"));
        }
        Ok(Self { config, tensors })
    }
}

/// Bounds-checked little-endian reads.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.remaining() {
            return Err(CodecError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }
}
