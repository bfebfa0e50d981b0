//! Byte-level builders for hand-made updates, written from `docs/wire-format.md` rather
//! than with the codec's own writers, so a vector made here does not share the encoder's
//! mistakes, and an invalid one can break exactly one rule.

/// A bit stream packed least-significant bit first.
#[derive(Default)]
pub struct Bits {
    bytes: Vec<u8>,
    len: usize,
}

impl Bits {
    /// Appends the low `n` bits of `value`, least significant first.
    pub fn push(&mut self, value: u64, n: u32) {
        for i in 0..n {
            if self.len.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if (value >> i) & 1 == 1 {
                let last = self.bytes.len() - 1;
                self.bytes[last] |= 1 << (self.len % 8);
            }
            self.len += 1;
        }
    }

    /// A Rice code: `gap >> r` zero bits, a one bit, the low `r` bits of `gap`.
    pub fn rice(&mut self, gap: u32, r: u32) {
        for _ in 0..(gap >> r) {
            self.push(0, 1);
        }
        self.push(1, 1);
        self.push(u64::from(gap), r);
    }

    /// The bytes, padded with zero bits.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// One chunk, field by field.
pub struct Chunk {
    pub lo: u16,
    pub hi: u16,
    pub rice: u32,
    pub gaps: Vec<u32>,
    pub codes: Vec<u32>,
}

impl Chunk {
    pub fn write(&self, bits: &mut Bits, value_bits: u8) {
        bits.push(u64::from(self.lo), 16);
        bits.push(u64::from(self.hi), 16);
        for &g in &self.gaps {
            bits.rice(g, self.rice);
        }
        for &c in &self.codes {
            bits.push(u64::from(c), u32::from(value_bits));
        }
    }

    /// One segment holding just this chunk.
    pub fn segment(&self, value_bits: u8) -> Vec<u8> {
        let mut bits = Bits::default();
        self.write(&mut bits, value_bits);
        bits.into_bytes()
    }
}

/// One tensor record. `segment_lens` defaults to the segments' real lengths.
#[derive(Clone)]
pub struct Record {
    pub name: Vec<u8>,
    pub ndim: Option<u8>,
    pub dims: Vec<u64>,
    pub segments: Vec<Vec<u8>>,
    pub segment_lens: Option<Vec<u32>>,
}

impl Record {
    pub fn new(name: &str, dims: &[u64], segments: Vec<Vec<u8>>) -> Self {
        Self {
            name: name.as_bytes().to_vec(),
            ndim: None,
            dims: dims.to_vec(),
            segments,
            segment_lens: None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.name);
        out.push(self.ndim.unwrap_or(self.dims.len() as u8));
        for d in &self.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        let lens = self.segment_lens.clone().unwrap_or_else(|| {
            let lens = self.segments.iter().map(|s| s.len() as u32);
            lens.collect()
        });
        for l in lens {
            out.extend_from_slice(&l.to_le_bytes());
        }
        for s in &self.segments {
            out.extend_from_slice(s);
        }
    }
}

/// A whole update, header field by field. `count` defaults to the number of records.
#[derive(Clone)]
pub struct Container {
    pub magic: [u8; 4],
    pub version: u16,
    pub bits: u8,
    pub flags: u8,
    pub chunk: u32,
    pub k: u32,
    pub segment_chunks: u32,
    pub count: Option<u32>,
    pub records: Vec<Record>,
    pub trailing: Vec<u8>,
}

impl Container {
    pub fn new(chunk: u32, k: u32, bits: u8, records: Vec<Record>) -> Self {
        Self {
            magic: *b"SLCO",
            version: 1,
            bits,
            flags: 0,
            chunk,
            k,
            segment_chunks: 256,
            count: None,
            records,
            trailing: Vec::new(),
        }
    }

    /// The serialised update with its CRC-32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.bits);
        out.push(self.flags);
        for field in [self.chunk, self.k, self.segment_chunks] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        let count = self.count.unwrap_or(self.records.len() as u32);
        out.extend_from_slice(&count.to_le_bytes());
        for r in &self.records {
            r.write(&mut out);
        }
        out.extend_from_slice(&self.trailing);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}
