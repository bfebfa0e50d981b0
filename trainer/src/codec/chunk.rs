//! One chunk: error-feedback update, top-k selection, quantisation, and its bit layout.
//!
//! Chunk payload, in bit order (see `docs/wire-format.md`):
//! `lo: 16` `hi: 16` (bf16 magnitudes) · k Rice-coded gaps · k value codes of `bits` each.

use super::bits::{BitReader, BitWriter, rice_parameter};
use super::{CodecError, ValueBits};

/// `|x|` bits at or above this are infinities and NaNs.
const NON_FINITE_BITS: u32 = 0x7f80_0000;

/// Per-worker buffers, reused across chunks so the hot loop never allocates.
pub(crate) struct Scratch {
    /// Candidate keys in index order, room for a whole chunk.
    keys: Vec<u64>,
    /// Copy of the candidates for selection (which reorders).
    select: Vec<u64>,
    picked: Vec<u32>,
    /// Threshold to try first on the next chunk: neighbouring chunks of a tensor have
    /// similar scales, so the previous chunk's k-th magnitude (lowered a little) usually
    /// admits 1–3k candidates. Any value is correct; a bad one only costs time.
    next_threshold: u32,
}

impl Scratch {
    pub fn new(chunk: usize) -> Self {
        Self {
            keys: vec![0; chunk],
            select: Vec::with_capacity(chunk),
            picked: Vec::new(),
            next_threshold: 0,
        }
    }
}

/// `|x|` as ordered integer bits: for non-negative floats the IEEE order is integer order.
#[inline(always)]
fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// bf16 at or below `x` (x ≥ 0, finite).
pub(crate) fn bf16_down(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

/// bf16 at or above `x` (x ≥ 0, finite), saturating at the largest finite bf16.
pub(crate) fn bf16_up(x: f32) -> u16 {
    let b = x.to_bits();
    let up = (b >> 16) + u32::from(b & 0xffff != 0);
    up.min(0x7f7f) as u16
}

pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// The magnitude grid of a chunk: `levels` bin midpoints uniformly covering `[lo, hi]`.
#[derive(Clone, Copy)]
struct Grid {
    lo: f32,
    step: f32,
    inv_step: f32,
    levels: u32,
}

impl Grid {
    fn new(lo: f32, hi: f32, bits: ValueBits) -> Self {
        let levels = 1u32 << (bits.bits() - 1);
        let step = (hi - lo) / levels as f32;
        let inv_step = if step > 0.0 { 1.0 / step } else { 0.0 };
        Self {
            lo,
            step,
            inv_step,
            levels,
        }
    }

    #[inline(always)]
    fn code(&self, magnitude: f32) -> u32 {
        (((magnitude - self.lo) * self.inv_step) as u32).min(self.levels - 1)
    }

    /// The one definition of a decoded magnitude, shared by encoder and decoder so both
    /// compute bit-identical values.
    #[inline(always)]
    fn level(&self, code: u32) -> f32 {
        self.lo + (code as f32 + 0.5) * self.step
    }
}

/// Entries kept in a chunk of `len` when full chunks keep `k` of `chunk`: a short tail
/// keeps the same density, rounded up, at least one.
pub(crate) fn k_for(len: usize, chunk: usize, k: usize) -> usize {
    if len == chunk {
        k
    } else {
        (k * len).div_ceil(chunk).clamp(1, len)
    }
}

/// How one chunk is encoded.
#[derive(Clone, Copy)]
pub(crate) struct ChunkParams {
    /// Error-feedback decay β.
    pub beta: f32,
    /// Entries to keep in this chunk (see [`k_for`]).
    pub k: usize,
    pub bits: ValueBits,
}

/// Folds `delta` into the error-feedback buffer (`e ← β·e + Δ`), selects the top `k`
/// entries of `e` by magnitude, quantises them, writes the chunk and subtracts the
/// *decoded* values from `e`. Returns the bits spent on indices.
pub(crate) fn encode(
    e: &mut [f32],
    delta: &[f32],
    p: ChunkParams,
    scratch: &mut Scratch,
    w: &mut BitWriter<'_>,
) -> Result<u64, CodecError> {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = avx2::Avx2::detect() {
        return encode_with(avx2, e, delta, p, scratch, w);
    }
    encode_with(Portable, e, delta, p, scratch, w)
}

/// The two loops that touch every entry, in a portable and (on x86-64) an AVX2 version.
/// Both give bit-identical results.
trait Kernel: Copy {
    /// `e ← β·e + Δ`, collecting candidates at or above `threshold` as [`Kernel::collect`]
    /// does, in the same pass. Returns the largest `|e|` as IEEE bits and the count.
    fn update_collect(
        self,
        e: &mut [f32],
        delta: &[f32],
        beta: f32,
        threshold: u32,
        keys: &mut [u64],
    ) -> (u32, usize);
    /// Writes the [`key`] of every entry with `|x|` bits ≥ `threshold` to `keys`, in
    /// index order; returns how many.
    fn collect(self, e: &[f32], threshold: u32, keys: &mut [u64]) -> usize;
}

#[derive(Clone, Copy)]
struct Portable;

impl Kernel for Portable {
    fn update_collect(
        self,
        e: &mut [f32],
        delta: &[f32],
        beta: f32,
        threshold: u32,
        keys: &mut [u64],
    ) -> (u32, usize) {
        let mut largest = 0u32;
        for (x, &d) in e.iter_mut().zip(delta) {
            *x = beta * *x + d;
            largest = largest.max(abs_bits(*x));
        }
        (largest, self.collect(e, threshold, keys))
    }

    fn collect(self, e: &[f32], threshold: u32, keys: &mut [u64]) -> usize {
        collect_from(e, 0, threshold, keys, 0)
    }
}

/// Scalar [`Kernel::collect`] over `e[from..]`, appending after `count` keys; returns the
/// new count.
#[inline(always)]
fn collect_from(
    e: &[f32],
    from: usize,
    threshold: u32,
    keys: &mut [u64],
    mut count: usize,
) -> usize {
    for (i, &x) in e.iter().enumerate().skip(from) {
        let a = abs_bits(x);
        if a >= threshold {
            keys[count] = key(a, i);
            count += 1;
        }
    }
    count
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Kernel, abs_bits, collect_from, key};

    /// Proof that the CPU has AVX2: only [`Avx2::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(());

    impl Avx2 {
        pub fn detect() -> Option<Self> {
            std::arch::is_x86_feature_detected!("avx2").then_some(Avx2(()))
        }
    }

    impl Kernel for Avx2 {
        fn update_collect(
            self,
            e: &mut [f32],
            delta: &[f32],
            beta: f32,
            threshold: u32,
            keys: &mut [u64],
        ) -> (u32, usize) {
            // SAFETY: an `Avx2` exists only where the CPU supports AVX2.
            unsafe { update_collect(e, delta, beta, threshold, keys) }
        }

        fn collect(self, e: &[f32], threshold: u32, keys: &mut [u64]) -> usize {
            // SAFETY: as above.
            unsafe { collect(e, threshold, keys) }
        }
    }

    /// Appends the keys of the set bits of `mask` (entries `base..base + 32`).
    #[inline(always)]
    fn push_hits(e: &[f32], base: usize, mut mask: u32, keys: &mut [u64], count: &mut usize) {
        while mask != 0 {
            let j = base + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            keys[*count] = key(abs_bits(e[j]), j);
            *count += 1;
        }
    }

    #[target_feature(enable = "avx2")]
    fn update_collect(
        e: &mut [f32],
        delta: &[f32],
        beta: f32,
        threshold: u32,
        keys: &mut [u64],
    ) -> (u32, usize) {
        let n = e.len().min(delta.len());
        let vbeta = _mm256_set1_ps(beta);
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        // a ≥ t ⇔ a > t − 1 as signed 32-bit: both are below 2^31, and t = 0 gives −1.
        let below = _mm256_set1_epi32(threshold as i32 - 1);
        let mut vmax = _mm256_setzero_si256();
        let mut count = 0;
        let mut i = 0;
        while i + 32 <= n {
            let mut mask = 0u32;
            for lane in 0..4 {
                let at = i + 8 * lane;
                // SAFETY: at + 8 <= i + 32 <= n, the length of both slices.
                let v = unsafe {
                    let x = _mm256_loadu_ps(e.as_ptr().add(at));
                    let d = _mm256_loadu_ps(delta.as_ptr().add(at));
                    // Multiply then add, two roundings: exactly the scalar `beta * x + d`.
                    let v = _mm256_add_ps(_mm256_mul_ps(vbeta, x), d);
                    _mm256_storeu_ps(e.as_mut_ptr().add(at), v);
                    v
                };
                let a = _mm256_and_si256(_mm256_castps_si256(v), abs);
                vmax = _mm256_max_epu32(vmax, a);
                let hit = _mm256_cmpgt_epi32(a, below);
                mask |= (_mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32) << (8 * lane);
            }
            push_hits(e, i, mask, keys, &mut count);
            i += 32;
        }
        let mut lanes = [0u32; 8];
        // SAFETY: `lanes` is 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), vmax) };
        let mut largest = lanes.into_iter().max().unwrap_or(0);
        for j in i..n {
            e[j] = beta * e[j] + delta[j];
            largest = largest.max(abs_bits(e[j]));
        }
        (largest, collect_from(e, i, threshold, keys, count))
    }

    #[target_feature(enable = "avx2")]
    fn collect(e: &[f32], threshold: u32, keys: &mut [u64]) -> usize {
        let n = e.len();
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        let below = _mm256_set1_epi32(threshold as i32 - 1);
        let mut count = 0;
        let mut i = 0;
        while i + 32 <= n {
            let mut mask = 0u32;
            for lane in 0..4 {
                // SAFETY: i + 8·lane + 8 <= i + 32 <= n.
                let x = unsafe { _mm256_loadu_si256(e.as_ptr().add(i + 8 * lane).cast()) };
                let hit = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs), below);
                mask |= (_mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32) << (8 * lane);
            }
            push_hits(e, i, mask, keys, &mut count);
            i += 32;
        }
        collect_from(e, i, threshold, keys, count)
    }
}

#[inline(always)]
fn encode_with(
    kernel: impl Kernel,
    e: &mut [f32],
    delta: &[f32],
    ChunkParams { beta, k, bits }: ChunkParams,
    scratch: &mut Scratch,
    w: &mut BitWriter<'_>,
) -> Result<u64, CodecError> {
    let mut threshold = scratch.next_threshold;
    let (largest, mut n) = kernel.update_collect(e, delta, beta, threshold, &mut scratch.keys);
    if largest >= NON_FINITE_BITS {
        return Err(CodecError::Overflow);
    }
    while n < k {
        // Too high for this chunk: halve it (one binade down), reaching 0 eventually.
        threshold = if threshold < 0x0100_0000 {
            0
        } else {
            threshold - 0x0080_0000
        };
        n = kernel.collect(e, threshold, &mut scratch.keys);
    }
    let candidates = &scratch.keys[..n];
    // The k-th largest key, found on a copy; filtering the index-ordered candidates by it
    // then yields exactly the top k (keys are unique), already in ascending position.
    let kth = if n > k {
        scratch.select.clear();
        scratch.select.extend_from_slice(candidates);
        *scratch.select.select_nth_unstable(n - k).1
    } else {
        candidates.iter().copied().min().unwrap_or(0)
    };
    scratch.picked.clear();
    scratch.picked.extend(
        candidates
            .iter()
            .filter(|&&key| key >= kth)
            .map(|&key| !(key as u32)),
    );
    debug_assert_eq!(scratch.picked.len(), k);
    let kth_magnitude = f32::from_bits((kth >> 32) as u32);
    scratch.next_threshold = abs_bits(kth_magnitude * 0.92);

    let (mut min, mut max) = (u32::MAX, 0u32);
    for &i in &scratch.picked {
        let a = abs_bits(e[i as usize]);
        min = min.min(a);
        max = max.max(a);
    }
    let (lo, hi) = (bf16_down(f32::from_bits(min)), bf16_up(f32::from_bits(max)));
    let grid = Grid::new(bf16_to_f32(lo), bf16_to_f32(hi), bits);
    w.write(u32::from(lo), 16);
    w.write(u32::from(hi), 16);

    let r = rice_parameter(e.len() as u32, k as u32);
    let mut index_bits = 0u64;
    let mut next = 0u32;
    for &i in &scratch.picked {
        let gap = i - next;
        index_bits += u64::from((gap >> r) + 1 + r);
        w.write_rice(gap, r);
        next = i + 1;
    }

    let mag_bits = u32::from(bits.bits()) - 1;
    for &i in &scratch.picked {
        let v = e[i as usize];
        let code = grid.code(v.abs());
        let decoded = grid.level(code).copysign(v);
        e[i as usize] = v - decoded;
        let sign = u32::from(v.is_sign_negative());
        w.write((sign << mag_bits) | code, u32::from(bits.bits()));
    }
    Ok(index_bits)
}

/// Selection key: larger magnitude first, then lower index, so the choice of the top k
/// is a pure function of the values (ties go to the lower index).
#[inline(always)]
fn key(abs_bits: u32, index: usize) -> u64 {
    (u64::from(abs_bits) << 32) | u64::from(!(index as u32))
}

/// Reads one chunk of `len` entries with `k` kept, calling `sink(position, value)` for each
/// kept entry in ascending position. Every field is checked: scales finite and ordered,
/// positions strictly increasing and inside the chunk.
pub(crate) fn decode(
    r: &mut BitReader<'_>,
    len: usize,
    k: usize,
    bits: ValueBits,
    positions: &mut Vec<u32>,
    mut sink: impl FnMut(usize, f32),
) -> Result<(), CodecError> {
    let lo = r.read(16)? as u16;
    let hi = r.read(16)? as u16;
    let (lo_f, hi_f) = (bf16_to_f32(lo), bf16_to_f32(hi));
    if !lo_f.is_finite() || !hi_f.is_finite() {
        return Err(CodecError::Corrupt("non-finite scale"));
    }
    if lo & 0x8000 != 0 || hi & 0x8000 != 0 || lo_f > hi_f {
        return Err(CodecError::Corrupt("scales not ordered 0 <= lo <= hi"));
    }
    let grid = Grid::new(lo_f, hi_f, bits);

    let rp = rice_parameter(len as u32, k as u32);
    let max_q = (len as u32 >> rp) + 1;
    positions.clear();
    let mut next = 0usize;
    for _ in 0..k {
        let gap = r.read_rice(rp, max_q)? as usize;
        let at = next + gap;
        if at >= len {
            return Err(CodecError::Corrupt("index outside its chunk"));
        }
        positions.push(at as u32);
        next = at + 1;
    }

    let nbits = u32::from(bits.bits());
    let mag_mask = (1u32 << (nbits - 1)) - 1;
    for &at in positions.iter() {
        let code = r.read(nbits)?;
        let magnitude = grid.level(code & mag_mask);
        let value = if code > mag_mask {
            -magnitude
        } else {
            magnitude
        };
        sink(at as usize, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Encodes a sequence of chunks with one kernel, returning the bytes and final `e`.
    fn encode_all(
        kernel: impl Kernel,
        e: &[f32],
        d: &[f32],
        chunk: usize,
        k: usize,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut e = e.to_vec();
        let mut out = vec![];
        let mut w = BitWriter::new(&mut out);
        let mut scratch = Scratch::new(chunk);
        for (e, d) in e.chunks_mut(chunk).zip(d.chunks(chunk)) {
            let kept = k_for(e.len(), chunk, k);
            let p = ChunkParams {
                beta: 0.9,
                k: kept,
                bits: ValueBits::Four,
            };
            encode_with(kernel, e, d, p, &mut scratch, &mut w).unwrap();
        }
        w.finish();
        (out, e)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every CPU must produce the same bytes: the AVX2 kernels against the portable ones,
        /// on lengths that are not multiples of the vector width and on chunks whose scale
        /// jumps (forcing the threshold fallback).
        #[test]
        fn kernels_agree_bit_for_bit(
            values in prop::collection::vec(-1.0f32..1.0, 1..5000),
            scales in prop::collection::vec(prop_oneof![Just(1e-4f32), Just(1.0), Just(1e3)], 8),
            chunk in prop_oneof![Just(37usize), Just(256), Just(1000)],
            k in 1usize..40,
        ) {
            let k = k.min(chunk);
            let d: Vec<f32> = values.iter().enumerate()
                .map(|(i, v)| v * scales[(i / chunk) % scales.len()]).collect();
            let e: Vec<f32> = d.iter().rev().map(|v| v * 0.5).collect();
            let portable = encode_all(Portable, &e, &d, chunk, k);
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = avx2::Avx2::detect() {
                let fast = encode_all(avx2, &e, &d, chunk, k);
                prop_assert_eq!(&portable.0, &fast.0);
                let same = portable.1.iter().zip(&fast.1).all(|(a, b)| a.to_bits() == b.to_bits());
                prop_assert!(same);
            }
            prop_assert!(!portable.0.is_empty());
        }
    }
}
