//! Little-endian bit streams and Golomb-Rice coding of index gaps.
//!
//! Bits are packed least-significant first: bit `i` of the stream is bit `i % 8` of byte
//! `i / 8`. A Rice code for `g` with parameter `r` is `g >> r` zero bits, a one bit, then the
//! low `r` bits of `g` (least significant first).

use super::CodecError;

/// Appends bits to a byte vector.
pub(crate) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    filled: u32,
}

impl<'a> BitWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            filled: 0,
        }
    }

    /// Writes the low `n` bits of `value` (`n` ≤ 32).
    #[inline]
    pub fn write(&mut self, value: u32, n: u32) {
        debug_assert!(n <= 32);
        let value = u64::from(value) & ((1u64 << n) - 1);
        self.acc |= value << self.filled;
        self.filled += n;
        if self.filled >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.filled -= 32;
        }
    }

    #[inline]
    pub fn write_rice(&mut self, gap: u32, r: u32) {
        let mut q = gap >> r;
        while q >= 32 {
            self.write(0, 32);
            q -= 32;
        }
        // q zero bits then a one: a single write of (1 << q).
        self.write(1 << q, q + 1);
        if r > 0 {
            self.write(gap, r);
        }
    }

    /// Pads with zero bits to a byte boundary and flushes.
    pub fn finish(mut self) {
        while self.filled > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled = self.filled.saturating_sub(8);
        }
    }
}

/// Reads bits from a byte slice; every read is bounds-checked.
pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    /// Position in bits.
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// Up to 64 bits starting at the current position, zero-filled past the end.
    #[inline]
    fn peek64(&self) -> u64 {
        let byte = self.pos / 8;
        let shift = self.pos % 8;
        let mut buf = [0u8; 8];
        let avail = self.data.len().saturating_sub(byte).min(8);
        buf[..avail].copy_from_slice(&self.data[byte..byte + avail]);
        u64::from_le_bytes(buf) >> shift
    }

    fn remaining(&self) -> usize {
        self.data.len() * 8 - self.pos
    }

    #[inline]
    pub fn read(&mut self, n: u32) -> Result<u32, CodecError> {
        if (n as usize) > self.remaining() {
            return Err(CodecError::Truncated);
        }
        let v = (self.peek64() & ((1u64 << n) - 1)) as u32;
        self.pos += n as usize;
        Ok(v)
    }

    /// Reads one Rice code, refusing quotients above `max_q` (a corrupt stream would
    /// otherwise walk through arbitrary amounts of zeros).
    #[inline]
    pub fn read_rice(&mut self, r: u32, max_q: u32) -> Result<u32, CodecError> {
        let mut q = 0u32;
        loop {
            let window = self.peek64();
            let avail = self.remaining().min(64 - self.pos % 8) as u32;
            let zeros = window.trailing_zeros().min(avail);
            if zeros < avail {
                q = q.saturating_add(zeros);
                self.pos += zeros as usize + 1;
                break;
            }
            if avail == 0 {
                return Err(CodecError::Truncated);
            }
            q = q.saturating_add(zeros);
            self.pos += zeros as usize;
            if q > max_q {
                return Err(CodecError::Corrupt("index gap out of range"));
            }
        }
        if q > max_q {
            return Err(CodecError::Corrupt("index gap out of range"));
        }
        let low = if r > 0 { self.read(r)? } else { 0 };
        u32::try_from((u64::from(q) << r) | u64::from(low))
            .map_err(|_| CodecError::Corrupt("index gap out of range"))
    }

    /// Whether every bit from the current position to the end of the input is zero: a
    /// segment's padding. Non-zero padding would give one update several valid byte forms.
    pub fn rest_is_zero(&self) -> bool {
        let mut probe = BitReader {
            data: self.data,
            pos: self.pos,
        };
        while probe.remaining() > 0 {
            let n = probe.remaining().min(32) as u32;
            if probe.read(n) != Ok(0) {
                return false;
            }
        }
        true
    }

    /// Bits consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

/// Rice parameter for the gaps between `k` sorted positions among `len`:
/// `⌊log2(⌊(len − k) / k⌋)⌋`, or 0 when that quotient is below 1.
///
/// For positions spread at random the gaps are close to geometric with mean
/// `(len − k)/k`, whose optimal Rice parameter is within one of this. Integer-only, so
/// any implementation derives the same value; it is never transmitted.
pub(crate) fn rice_parameter(len: u32, k: u32) -> u32 {
    let mean_gap = len.saturating_sub(k) / k.max(1);
    mean_gap.checked_ilog2().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_fields_round_trip_across_word_boundaries() {
        let mut buf = vec![];
        let mut w = BitWriter::new(&mut buf);
        let fields: Vec<(u32, u32)> = (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761u32) >> 3, 1 + i % 32))
            .collect();
        for &(v, n) in &fields {
            w.write(v, n);
        }
        w.finish();
        let total: u32 = fields.iter().map(|f| f.1).sum();
        assert_eq!(buf.len(), total.div_ceil(8) as usize);
        let mut r = BitReader::new(&buf);
        for &(v, n) in &fields {
            let mask = if n == 32 { u32::MAX } else { (1 << n) - 1 };
            assert_eq!(r.read(n).unwrap(), v & mask);
        }
    }

    #[test]
    fn rice_codes_round_trip_including_long_unary_runs() {
        for r in [0, 1, 5, 6, 12] {
            let gaps = [0u32, 1, 63, 64, 65, 1000, 4095, 70_000];
            let mut buf = vec![];
            let mut w = BitWriter::new(&mut buf);
            for &g in &gaps {
                w.write_rice(g, r);
            }
            w.finish();
            let mut rd = BitReader::new(&buf);
            for &g in &gaps {
                assert_eq!(rd.read_rice(r, u32::MAX).unwrap(), g, "r={r}");
            }
        }
    }

    #[test]
    fn reading_past_the_end_is_an_error_not_a_panic() {
        let mut r = BitReader::new(&[0xff]);
        assert!(r.read(8).is_ok());
        assert!(matches!(r.read(1), Err(CodecError::Truncated)));
        let mut r = BitReader::new(&[0, 0]);
        assert!(r.read_rice(3, u32::MAX).is_err());
        let mut r = BitReader::new(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(matches!(r.read_rice(0, 10), Err(CodecError::Corrupt(_))));
    }

    #[test]
    fn rice_parameter_tracks_the_mean_gap() {
        // Mean gap 63 for 64 of 4096: expected code length is 7.53 bits at r = 5 and
        // 7.58 at r = 6 (geometric gaps), so 5.
        assert_eq!(rice_parameter(4096, 64), 5);
        assert_eq!(rice_parameter(4096, 32), 6);
        assert_eq!(rice_parameter(100, 100), 0);
        assert_eq!(rice_parameter(100, 60), 0);
        assert_eq!(rice_parameter(1 << 20, 1), 19);
    }
}
