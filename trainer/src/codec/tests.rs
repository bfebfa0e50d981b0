use proptest::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::chunk::{bf16_down, bf16_to_f32, bf16_up, k_for};
use super::*;

fn config(chunk: u32, k: u32, bits: u8) -> CodecConfig {
    CodecConfig::new(chunk, k, ValueBits::try_from(bits).unwrap()).unwrap()
}

/// The top-k positions of one chunk the slow, obviously right way: sort by magnitude
/// (descending), then position (ascending).
fn reference_top_k(e: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..e.len()).collect();
    order.sort_by(|&a, &b| e[b].abs().total_cmp(&e[a].abs()).then(a.cmp(&b)));
    let mut top = order[..k].to_vec();
    top.sort_unstable();
    top
}

/// Values mixing ordinary floats, exact ties, zeros of both signs and denormals.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -10.0f32..10.0,
        2 => (-3i32..=3).prop_map(|i| i as f32 * 0.5),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (1u32..0x0080_0000).prop_map(f32::from_bits),
        1 => (1u32..0x0080_0000).prop_map(|b| -f32::from_bits(b)),
    ]
}

struct Outcome {
    /// `β·e + Δ` before anything was sent.
    accumulated: Vec<f32>,
    ef_after: Vec<f32>,
    /// Decoded update, densified.
    decoded: Vec<f32>,
    positions: Vec<usize>,
}

fn run(cfg: CodecConfig, beta: f32, delta: &[f32], ef: &[f32]) -> Outcome {
    let accumulated: Vec<f32> = ef.iter().zip(delta).map(|(e, d)| beta * e + d).collect();
    let mut ef_after = ef.to_vec();
    let shape = [delta.len() as u64];
    let encoded = Compressor::new(cfg, beta)
        .unwrap()
        .compress("w", &shape, Finite::new(delta).unwrap(), &mut ef_after)
        .unwrap();
    let mut decoded = vec![0.0; delta.len()];
    encoded.decode_add(1.0, &mut decoded).unwrap();
    let mut positions = vec![];
    encoded.for_each_entry(|at, _| positions.push(at)).unwrap();
    Outcome {
        accumulated,
        ef_after,
        decoded,
        positions,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn selected_positions_equal_the_reference_top_k(
        values in prop::collection::vec(value(), 1..4000),
        chunk in prop_oneof![Just(64u32), Just(100), Just(256), Just(1024)],
        k_frac in 0.0f64..1.0,
        beta in prop_oneof![Just(0.0f32), Just(0.9), Just(1.0)],
    ) {
        let k = ((f64::from(chunk) * k_frac) as u32).max(1);
        let cfg = config(chunk, k, 2);
        let (ef, delta) = values.split_at(values.len() / 3);
        let delta = delta.to_vec();
        let ef: Vec<f32> = ef.iter().copied().cycle().take(delta.len()).collect();
        let ef = if ef.len() == delta.len() { ef } else { vec![0.0; delta.len()] };
        let out = run(cfg, beta, &delta, &ef);
        let mut expected = vec![];
        for (c, e) in out.accumulated.chunks(chunk as usize).enumerate() {
            let kept = k_for(e.len(), chunk as usize, k as usize);
            expected.extend(reference_top_k(e, kept).into_iter().map(|i| c * chunk as usize + i));
        }
        prop_assert_eq!(out.positions, expected);
    }

    #[test]
    fn error_feedback_keeps_exactly_what_was_not_sent(
        delta in prop::collection::vec(-1.0f32..1.0, 1..3000),
        chunk in prop_oneof![Just(64u32), Just(512)],
        k in 1u32..64,
        bits in prop_oneof![Just(2u8), Just(4), Just(8)],
    ) {
        let cfg = config(chunk, k, bits);
        let ef = vec![0.0; delta.len()];
        let out = run(cfg, 0.95, &delta, &ef);
        let kept: std::collections::HashSet<_> = out.positions.iter().copied().collect();
        for i in 0..delta.len() {
            if kept.contains(&i) {
                prop_assert_eq!(out.ef_after[i], out.accumulated[i] - out.decoded[i]);
            } else {
                prop_assert_eq!(out.decoded[i], 0.0);
                prop_assert_eq!(out.ef_after[i], out.accumulated[i]);
            }
        }
        // The documented bound, per chunk: |v − decode(v)| ≤ (hi − lo) / 2^bits.
        for (c, acc) in out.accumulated.chunks(chunk as usize).enumerate() {
            let base = c * chunk as usize;
            let here: Vec<usize> = out.positions.iter().copied()
                .filter(|&p| p >= base && p < base + acc.len()).collect();
            let mags = here.iter().map(|&p| out.accumulated[p].abs());
            let lo = bf16_to_f32(bf16_down(mags.clone().fold(f32::INFINITY, f32::min)));
            let hi = bf16_to_f32(bf16_up(mags.fold(0.0, f32::max)));
            let bound = (hi - lo) / f32::from(1u16 << bits) * (1.0 + 1e-5) + 1e-30;
            for &p in &here {
                let err = (out.accumulated[p] - out.decoded[p]).abs();
                prop_assert!(err <= bound, "err {} > bound {} at {}", err, bound, p);
                prop_assert_eq!(out.decoded[p].is_sign_negative(), out.accumulated[p] < 0.0);
            }
        }
    }

    #[test]
    fn updates_round_trip_through_bytes(
        sizes in prop::collection::vec(1usize..2000, 1..4),
        bits in prop_oneof![Just(2u8), Just(4), Just(8)],
        seed in any::<u64>(),
    ) {
        let cfg = config(128, 8, bits);
        let compressor = Compressor::new(cfg, 0.9).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let tensors: Vec<EncodedTensor> = sizes.iter().enumerate().map(|(i, &n)| {
            let delta: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut ef = vec![0.0; n];
            compressor.compress(&format!("t{i}"), &[n as u64], Finite::new(&delta).unwrap(), &mut ef).unwrap()
        }).collect();
        let update = Update::new(cfg, tensors).unwrap();
        let bytes = update.to_bytes();
        let parsed = Update::from_bytes(&bytes).unwrap();
        prop_assert_eq!(parsed.to_bytes(), bytes);
        for (a, b) in update.tensors().iter().zip(parsed.tensors()) {
            let (mut x, mut y) = (vec![0.0; a.numel()], vec![0.0; b.numel()]);
            a.decode_add(0.5, &mut x).unwrap();
            b.decode_add(0.5, &mut y).unwrap();
            prop_assert_eq!(x, y);
        }
    }
}

fn sample_update(seed: u64) -> (Update, Vec<u8>) {
    let cfg = config(256, 16, 2);
    let compressor = Compressor::new(cfg, 0.95).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes: [&[u64]; 3] = [&[24, 40], &[300], &[3, 7]];
    let tensors = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n = shape.iter().product::<u64>() as usize;
            let delta: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut ef = vec![0.0; n];
            compressor
                .compress(
                    &format!("layer.{i}"),
                    shape,
                    Finite::new(&delta).unwrap(),
                    &mut ef,
                )
                .unwrap()
        })
        .collect();
    let update = Update::new(cfg, tensors).unwrap();
    let bytes = update.to_bytes();
    (update, bytes)
}

fn with_fixed_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn every_truncation_is_a_typed_error() {
    let (_, bytes) = sample_update(1);
    for len in 0..bytes.len() {
        let err = Update::from_bytes(&bytes[..len]).unwrap_err();
        // A prefix ends mid-structure or fails its checksum; it never parses.
        assert!(
            matches!(
                err,
                CodecError::Truncated | CodecError::BadMagic | CodecError::Checksum { .. }
            ),
            "prefix {len}: {err}"
        );
    }
    // A prefix re-sealed with a valid checksum is caught by the structure itself.
    for len in 28..bytes.len() - 4 {
        let mut cut = bytes[..len].to_vec();
        cut.extend_from_slice(&[0; 4]);
        let err = Update::from_bytes(&with_fixed_checksum(cut)).unwrap_err();
        assert!(!matches!(err, CodecError::Checksum { .. }), "prefix {len}");
    }
}

#[test]
fn mutated_encodings_never_panic_and_decode_only_when_valid() {
    let (_, bytes) = sample_update(2);
    let mut rng = StdRng::seed_from_u64(7);
    let (mut rejected, mut accepted) = (0, 0);
    for _ in 0..4000 {
        let mut m = bytes.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..m.len() - 4);
            m[at] ^= 1 << rng.random_range(0..8);
        }
        if m == bytes {
            continue; // two flips of the same bit
        }
        // Without the checksum fix-up the CRC catches it; with it, the decoder must.
        let plain = Update::from_bytes(&m);
        assert!(
            matches!(
                plain,
                Err(CodecError::Checksum { .. }
                    | CodecError::BadMagic
                    | CodecError::UnsupportedVersion(_))
            ),
            "{plain:?}"
        );
        match Update::from_bytes(&with_fixed_checksum(m)) {
            Err(_) => rejected += 1,
            Ok(update) => {
                accepted += 1;
                for t in update.tensors() {
                    let mut out = vec![0.0; t.numel()];
                    t.decode_add(1.0, &mut out).unwrap();
                    assert!(out.iter().all(|v| v.is_finite()));
                }
            }
        }
    }
    // Flipped value bits still make a valid update; most other flips do not.
    assert!(
        rejected > 1000 && accepted > 100,
        "{rejected} rejected, {accepted} accepted"
    );
}

#[test]
fn claimed_sizes_are_not_trusted_before_the_bytes_exist() {
    let (_, bytes) = sample_update(3);
    // Tensor count of 4 billion in a few hundred bytes.
    let mut m = bytes.clone();
    m[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Update::from_bytes(&with_fixed_checksum(m)),
        Err(CodecError::Truncated)
    );
    // First tensor claims 2^40 entries: its segment table alone would need gigabytes.
    let mut m = bytes.clone();
    let dims = 24 + 2 + "layer.0".len() + 1;
    m[dims..dims + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    m[dims + 8..dims + 16].copy_from_slice(&(1u64 << 20).to_le_bytes());
    assert_eq!(
        Update::from_bytes(&with_fixed_checksum(m)),
        Err(CodecError::Truncated)
    );
    // Overflowing shape product.
    let mut m = bytes;
    m[dims..dims + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Update::from_bytes(&with_fixed_checksum(m)),
        Err(CodecError::InTensor { .. })
    ));
}

#[test]
fn header_errors_are_specific() {
    let (_, bytes) = sample_update(4);
    assert_eq!(Update::from_bytes(b"nope"), Err(CodecError::BadMagic));
    let mut m = bytes.clone();
    m[4] = 9;
    assert_eq!(
        Update::from_bytes(&m),
        Err(CodecError::UnsupportedVersion(9))
    );
    let mut m = bytes.clone();
    m[6] = 3;
    assert!(matches!(
        Update::from_bytes(&with_fixed_checksum(m)),
        Err(CodecError::InvalidConfig(_))
    ));
    let mut m = bytes.clone();
    m.push(0);
    assert!(matches!(
        Update::from_bytes(&m),
        Err(CodecError::Checksum { .. })
    ));
    let mut m = bytes;
    let end = m.len() - 4;
    m.insert(end, 0);
    assert_eq!(
        Update::from_bytes(&with_fixed_checksum(m)),
        Err(CodecError::Corrupt("trailing bytes after the last tensor"))
    );
}

#[test]
fn out_of_range_indices_and_bad_scales_are_caught_after_the_checksum() {
    // One chunk of 64 with k = 64: every position is kept, so gaps are all zero and a
    // gap of one pushes the last index out of the chunk.
    let cfg = config(64, 64, 2);
    let mut ef = vec![0.0; 64];
    let delta: Vec<f32> = (0..64).map(|i| i as f32 - 31.5).collect();
    let t = Compressor::new(cfg, 0.0)
        .unwrap()
        .compress("w", &[64], Finite::new(&delta).unwrap(), &mut ef)
        .unwrap();
    let bytes = Update::new(cfg, vec![t]).unwrap().to_bytes();
    let payload = 24 + 2 + 1 + 1 + 8 + 4;
    // Scales are bits 0..32; the first Rice code (r = 0) is bit 32: a 1. Make it `01`.
    let mut m = bytes.clone();
    m[payload + 4] &= !1;
    // Refused by the chunk bound itself: without it the decoder reads on and fails
    // later, differently (the update then looks truncated).
    let err = Update::from_bytes(&with_fixed_checksum(m)).unwrap_err();
    assert_eq!(
        err,
        CodecError::InChunk {
            tensor: "w".into(),
            chunk: 0,
            source: Box::new(CodecError::Corrupt("index outside its chunk")),
        },
        "{err}"
    );
    // Scale `lo` becomes NaN.
    let mut m = bytes.clone();
    m[payload..payload + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    let err = Update::from_bytes(&with_fixed_checksum(m)).unwrap_err();
    assert!(err.to_string().contains("non-finite scale"), "{err}");
    // lo > hi.
    let mut m = bytes;
    m[payload..payload + 2].copy_from_slice(&0x7f00u16.to_le_bytes());
    let err = Update::from_bytes(&with_fixed_checksum(m)).unwrap_err();
    assert!(err.to_string().contains("scales not ordered"), "{err}");
}

#[test]
fn layout_checks_name_the_offending_tensor() {
    let (update, _) = sample_update(5);
    let model: Vec<(&str, &[u64])> = vec![
        ("layer.0", &[24, 40]),
        ("layer.1", &[300]),
        ("layer.2", &[3, 7]),
    ];
    assert_eq!(update.check_layout(model.iter().copied()), Ok(()));
    let mut wrong = model.clone();
    wrong[1].1 = &[301];
    assert!(matches!(
        update.check_layout(wrong.iter().copied()),
        Err(CodecError::ShapeMismatch { tensor, .. }) if tensor == "layer.1"
    ));
    assert_eq!(
        update.check_layout(model[..2].iter().copied()),
        Err(CodecError::UnexpectedTensor("layer.2".into()))
    );
    let mut more = model.clone();
    more.push(("layer.3", &[1]));
    assert_eq!(
        update.check_layout(more.iter().copied()),
        Err(CodecError::MissingTensor("layer.3".into()))
    );
    let t = update.tensors()[0].clone();
    assert_eq!(
        Update::new(update.config(), vec![t.clone(), t]),
        Err(CodecError::DuplicateTensor("layer.0".into()))
    );
}

#[test]
fn non_finite_pseudo_gradients_are_refused_where_they_are_computed() {
    let global = vec![1.0f32; 200_000];
    let mut local = vec![0.5f32; 200_000];
    let mut delta = vec![0.0; 200_000];
    let d = Finite::pseudo_gradient(&global, &local, &mut delta).unwrap();
    assert!(d.as_slice().iter().all(|&v| v == 0.5));
    for (at, bad) in [
        (77_777, f32::NAN),
        (199_999, f32::INFINITY),
        (0, f32::NEG_INFINITY),
    ] {
        local[at] = bad;
        assert_eq!(
            Finite::pseudo_gradient(&global, &local, &mut delta).unwrap_err(),
            CodecError::NonFinite { index: at }
        );
        assert_eq!(
            Finite::new(&delta).unwrap_err(),
            CodecError::NonFinite { index: at }
        );
        local[at] = 0.5;
    }
    assert!(Finite::pseudo_gradient(&global, &local[1..], &mut delta).is_err());
}

#[test]
fn lengths_and_configs_are_checked() {
    let c = Compressor::new(config(64, 4, 2), 0.9).unwrap();
    let mut ef = vec![0.0; 10];
    assert!(matches!(
        c.compress("w", &[11], Finite::new(&[0.0; 11]).unwrap(), &mut ef),
        Err(CodecError::LengthMismatch { .. })
    ));
    assert!(CodecConfig::new(64, 65, ValueBits::Two).is_err());
    assert!(CodecConfig::new(0, 1, ValueBits::Two).is_err());
    assert!(CodecConfig::new(MAX_CHUNK + 1, 1, ValueBits::Two).is_err());
    assert!(Compressor::new(config(64, 4, 2), 1.5).is_err());
    assert!(ValueBits::try_from(3).is_err());
    let t = c
        .compress("w", &[10], Finite::new(&[1.0; 10]).unwrap(), &mut ef)
        .unwrap();
    assert!(matches!(
        t.decode_add(1.0, &mut [0.0; 9]),
        Err(CodecError::LengthMismatch { .. })
    ));
}

#[test]
fn a_quiet_chunk_after_a_loud_one_still_gets_its_exact_top_k() {
    // Each chunk first tries a threshold derived from the previous chunk. Here chunk 1 is
    // a million times quieter than chunk 0 (and full of ties), so that guess admits
    // nothing and selection must lower it until k candidates qualify.
    let (chunk, k) = (4096usize, 64usize);
    let mut delta = vec![0.0f32; 3 * chunk];
    for (i, d) in delta.iter_mut().enumerate() {
        *d = match i / chunk {
            0 => 1000.0 + (i % 97) as f32,
            1 => 1e-3 * ((i % 5) as f32 - 2.0),
            _ => 0.0, // all-equal chunk (unused embedding rows): every entry ties
        };
    }
    let cfg = config(chunk as u32, k as u32, 2);
    let out = run(cfg, 0.0, &delta, &vec![0.0; delta.len()]);
    let mut expected = vec![];
    for (c, e) in delta.chunks(chunk).enumerate() {
        expected.extend(reference_top_k(e, k).into_iter().map(|i| c * chunk + i));
    }
    assert_eq!(out.positions, expected);
    assert_eq!(
        &out.positions[2 * k..],
        &(2 * chunk..2 * chunk + k).collect::<Vec<_>>()[..]
    );
}

#[test]
fn tail_chunks_keep_the_same_density_rounded_up() {
    assert_eq!(k_for(4096, 4096, 64), 64);
    assert_eq!(k_for(100, 4096, 64), 2); // 64·100/4096 = 1.56 → 2
    assert_eq!(k_for(1, 4096, 64), 1);
    assert_eq!(k_for(10, 16, 16), 10);
    let cfg = config(4096, 64, 2);
    let delta: Vec<f32> = (0..8192 + 100).map(|i| (i as f32).sin()).collect();
    let out = run(cfg, 0.0, &delta, &vec![0.0; delta.len()]);
    assert_eq!(out.positions.len(), 64 + 64 + 2);
}

#[test]
fn error_feedback_eventually_sends_everything() {
    // With β = 1 nothing is forgotten: what was sent plus what is left equals the sum of
    // all pseudo-gradients, so small entries are sent once they have accumulated.
    let cfg = config(64, 4, 4);
    let c = Compressor::new(cfg, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    // Magnitudes bounded away from zero: an entry of size |d| is sent about every
    // (Σ|d| / k) / |d| rounds, so a tiny one could legitimately wait hundreds of rounds.
    let delta: Vec<f32> = (0..640)
        .map(|_| rng.random_range(0.5f32..1.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let mut ef = vec![0.0; 640];
    let mut sent = vec![0.0f32; 640];
    let rounds = 64;
    let mut ever_sent = vec![false; 640];
    for _ in 0..rounds {
        let t = c
            .compress("w", &[640], Finite::new(&delta).unwrap(), &mut ef)
            .unwrap();
        t.decode_add(1.0, &mut sent).unwrap();
        t.for_each_entry(|at, _| ever_sent[at] = true).unwrap();
    }
    for i in 0..640 {
        let total = rounds as f32 * delta[i];
        assert!((sent[i] + ef[i] - total).abs() < 1e-3, "entry {i}");
    }
    assert!(ever_sent.iter().all(|&s| s), "some entry was never sent");
}

#[test]
fn index_coding_beats_fixed_width_indices() {
    let cfg = config(4096, 64, 2);
    let mut rng = StdRng::seed_from_u64(11);
    let n = 4096 * 64;
    let delta: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t = Compressor::new(cfg, 0.0)
        .unwrap()
        .compress(
            "w",
            &[n as u64],
            Finite::new(&delta).unwrap(),
            &mut vec![0.0; n],
        )
        .unwrap();
    let per_index = t.index_bits() as f64 / (64.0 * 64.0);
    // Fixed width is 12 bits; the floor log2 C(4096, 64)/64 is about 7.4.
    assert_eq!(cfg.fixed_index_bits(n), 64 * 64 * 12);
    assert!(
        (7.4..8.0).contains(&per_index),
        "{per_index} bits per index"
    );
}

#[test]
fn weighted_mean_matches_a_dense_reference() {
    let cfg = config(128, 16, 8);
    let c = Compressor::new(cfg, 0.0).unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let n = 1000;
    let peers: Vec<EncodedTensor> = (0..3)
        .map(|_| {
            let d: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            c.compress(
                "w",
                &[n as u64],
                Finite::new(&d).unwrap(),
                &mut vec![0.0; n],
            )
            .unwrap()
        })
        .collect();
    let weights = [1.0f32, 3.0, 0.0];
    let mut expected = vec![0.0f32; n];
    for (p, w) in peers.iter().zip(weights) {
        p.decode_add(w / 4.0, &mut expected).unwrap();
    }
    let inputs: Vec<_> = peers.iter().zip(weights).collect();
    let mut out = vec![7.0; n];
    aggregate(AggregationRule::WeightedMean, &inputs, &mut out).unwrap();
    for (a, b) in out.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-6);
    }
    let none: Vec<_> = peers.iter().map(|p| (p, 0.0)).collect();
    aggregate(AggregationRule::WeightedMean, &none, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
    assert!(
        aggregate(
            AggregationRule::WeightedMean,
            &[(&peers[0], f32::NAN)],
            &mut out
        )
        .is_err()
    );
}

#[test]
fn median_clip_limits_an_outsized_peer_and_averages_over_selectors() {
    // k = 32 of 64: each peer selects exactly the half of the chunk it is nonzero in.
    let cfg = config(64, 32, 8);
    let c = Compressor::new(cfg, 0.0).unwrap();
    let make = |scale: f32, first_half: bool| {
        let d: Vec<f32> = (0..64)
            .map(|i| if (i < 32) == first_half { scale } else { 0.0 })
            .collect();
        c.compress("w", &[64], Finite::new(&d).unwrap(), &mut vec![0.0; 64])
            .unwrap()
    };
    let honest_a = make(1.0, true);
    let honest_b = make(1.0, true);
    let loud = make(100.0, true);
    let other_half = make(1.0, false);
    let inputs = [
        (&honest_a, 1.0),
        (&honest_b, 1.0),
        (&loud, 1.0),
        (&other_half, 1.0),
    ];
    let mut out = vec![0.0; 64];
    aggregate(
        AggregationRule::MedianNormClipSelectedMean,
        &inputs,
        &mut out,
    )
    .unwrap();
    // The loud peer is clipped to the median norm and the first half is averaged over
    // the three peers that sent it: ≈ 1, where a plain mean gives (1 + 1 + 100) / 4.
    for v in &out[..32] {
        assert!((v - 1.0).abs() < 0.01, "{v}");
    }
    // Only one peer sent the second half, so it is not diluted by the other three.
    for v in &out[32..] {
        assert!((v - 1.0).abs() < 0.01, "{v}");
    }
    let mut plain = vec![0.0; 64];
    aggregate(AggregationRule::WeightedMean, &inputs, &mut plain).unwrap();
    assert!((plain[0] - 25.5).abs() < 0.1 && (plain[40] - 0.25).abs() < 0.01);
}

#[test]
fn median_clip_scales_only_above_the_median_of_an_even_count_and_keeps_weights() {
    // One value per peer (k = 1), exact in bf16, so each norm is its value.
    let cfg = config(64, 1, 8);
    let c = Compressor::new(cfg, 0.0).unwrap();
    let spike = |at: usize, v: f32| {
        let mut d = vec![0.0f32; 64];
        d[at] = v;
        c.compress("w", &[64], Finite::new(&d).unwrap(), &mut vec![0.0; 64])
            .unwrap()
    };
    // Norms 1, 2, 4 and 16: the median of the even count is (2 + 4) / 2 = 3, not 2 or
    // 4. Two peers lie below it (and keep their size), two above (clipped to 3).
    let (a, b, c3, d) = (spike(3, 1.0), spike(3, 2.0), spike(9, 4.0), spike(9, 16.0));
    let inputs = [(&a, 2.0), (&b, 0.25), (&c3, 3.0), (&d, 1.5)];
    let mut out = vec![0.0; 64];
    aggregate(
        AggregationRule::MedianNormClipSelectedMean,
        &inputs,
        &mut out,
    )
    .unwrap();
    // Coordinate 3: the weighted mean of 1 and 2 over their own weights,
    // (2·1 + 0.25·2) / 2.25; scaling them up to the median would give 3, dropping the
    // weights 1.5.
    let expected = (2.0 * 1.0 + 0.25 * 2.0) / 2.25;
    assert!((out[3] - expected).abs() < 1e-4, "{} vs {expected}", out[3]);
    // Coordinate 9: both clipped to the median, whatever their weights.
    assert!((out[9] - 3.0).abs() < 1e-4, "{}", out[9]);
    let sent: Vec<usize> = (0..64).filter(|&i| out[i] != 0.0).collect();
    assert_eq!(sent, [3, 9]);
}

#[test]
fn selected_mean_divides_by_the_peers_that_sent_a_coordinate() {
    let cfg = config(64, 1, 8);
    let c = Compressor::new(cfg, 0.0).unwrap();
    let spike = |at: usize, v: f32| {
        let mut d = vec![0.0f32; 64];
        d[at] = v;
        c.compress("w", &[64], Finite::new(&d).unwrap(), &mut vec![0.0; 64])
            .unwrap()
    };
    let (a, b, other) = (spike(3, 2.0), spike(3, 2.0), spike(9, 2.0));
    let mut out = vec![0.0; 64];
    aggregate(
        AggregationRule::MedianNormClipSelectedMean,
        &[(&a, 1.0), (&b, 1.0), (&other, 1.0)],
        &mut out,
    )
    .unwrap();
    assert!((out[3] - 2.0).abs() < 0.02, "{}", out[3]);
    assert!((out[9] - 2.0).abs() < 0.02, "{}", out[9]);
    let mut mean = vec![0.0; 64];
    aggregate(
        AggregationRule::WeightedMean,
        &[(&a, 1.0), (&b, 1.0), (&other, 1.0)],
        &mut mean,
    )
    .unwrap();
    assert!((mean[9] - 2.0 / 3.0).abs() < 0.02);
}

#[test]
fn a_segment_with_non_zero_padding_is_refused_so_each_update_has_one_byte_form() {
    let (update, _) = sample_update(3);
    let mut padded = 0;
    for (ti, t) in update.tensors().iter().enumerate() {
        for &end in &t.segment_ends {
            // Bits are packed from the least significant end: padding is the top bits
            // of a segment's last byte.
            let mut tensors = update.tensors().to_vec();
            tensors[ti].payload[end - 1] |= 0x80;
            if tensors[ti].payload == t.payload {
                continue; // that bit is set in the content
            }
            let bytes = Update::new(update.config(), tensors).unwrap().to_bytes();
            match Update::from_bytes(&bytes) {
                Err(e) if e.to_string().contains("non-zero padding") => padded += 1,
                // The top bit was content: flipping it may change a value or break a code.
                Ok(_) | Err(_) => {}
            }
        }
    }
    assert!(padded > 0, "no segment of the sample has padding to test");
    // And the untouched update still reads back, to the same bytes.
    let bytes = update.to_bytes();
    assert_eq!(Update::from_bytes(&bytes).unwrap().to_bytes(), bytes);
}
