use candle_core::Device;

use super::dense::DenseUpdate;
use super::*;
use crate::codec::{CodecConfig, ValueBits};
use crate::data::Assignment;
use crate::model::{AdamWConfig, InnerOptimizer, LrSchedule};
use crate::testing::{loss_on, shakespeare, small_config as small};

fn bits(m: &Llama) -> Vec<u32> {
    read(m)
        .unwrap()
        .concat()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

struct Outcome {
    before: f32,
    after: f32,
    /// Dense fp32 bytes of all pseudo-gradients / bytes actually sent.
    ratio: f64,
}

/// Three peers train for six rounds of 15 inner steps with `outer`; replicas must be
/// bit-identical after every round.
fn federate<S: OuterLoop>(
    outer: impl Fn(&Llama) -> S,
    outer_lr: f32,
    bytes: impl Fn(&S::Update<'static>) -> usize,
) -> Outcome {
    let (peers, rounds, inner, rows, seq) = (3usize, 6u32, 15usize, 16usize, 64usize);
    let (train, val) = shakespeare(seq);
    let assignment =
        Assignment::new(9, peers as u32, (inner * rows) as u64, seq, train.len()).unwrap();
    let schedule = LrSchedule {
        peak: 3e-3,
        warmup: 10,
        total: u64::from(rounds) * inner as u64,
        floor: 0.1,
    };
    let models: Vec<Llama> = (0..peers)
        .map(|_| Llama::new(small(), 9, &Device::Cpu).unwrap())
        .collect();
    let mut opts: Vec<_> = models
        .iter()
        .map(|m| InnerOptimizer::new(m, AdamWConfig::default(), schedule.clone()).unwrap())
        .collect();
    let mut states: Vec<S> = models.iter().map(&outer).collect();
    let before = loss_on(&models[0], &val);
    let mut sent = 0;
    for round in 0..rounds {
        let mut updates = vec![];
        for p in 0..peers {
            for w in assignment.peer_round(p as u32, round).chunks(rows) {
                opts[p]
                    .step(&models[p], &assignment.batch(&train, w), rows)
                    .unwrap();
            }
            let u = states[p].make_update(&models[p]).unwrap();
            sent += bytes(&u);
            updates.push(u);
        }
        let weighted: Vec<_> = updates.iter().map(|u| (u, 1.0)).collect();
        for (state, model) in states.iter_mut().zip(&models) {
            state.apply(model, &weighted, outer_lr).unwrap();
        }
        let reference = bits(&models[0]);
        for m in &models[1..] {
            assert!(bits(m) == reference, "replicas diverged in round {round}");
        }
    }
    let dense = 4 * models[0].parameter_count() * peers * rounds as usize;
    Outcome {
        before,
        after: loss_on(&models[0], &val),
        ratio: dense as f64 / sent as f64,
    }
}

#[test]
fn sparseloco_peers_improve_together_on_a_hundredth_of_the_traffic() {
    let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
    let sparse = federate(
        |m| {
            let c = Compressor::new(codec, 0.95).unwrap();
            RoundState::new(m, c, AggregationRule::WeightedMean).unwrap()
        },
        1.0,
        |u| u.to_bytes().len(),
    );
    let dense = federate(
        |m| DilocoState::new(m, 0.9).unwrap(),
        0.7,
        |u| u.to_bytes().len(),
    );
    eprintln!(
        "held-out loss: SparseLoCo {:.3} -> {:.3} ({:.0}x less traffic), DiLoCo {:.3} -> {:.3} ({:.2}x)",
        sparse.before, sparse.after, sparse.ratio, dense.before, dense.after, dense.ratio
    );
    assert!(
        sparse.after < sparse.before - 1.0,
        "SparseLoCo: {} -> {}",
        sparse.before,
        sparse.after
    );
    assert!(
        dense.after < dense.before - 1.0,
        "DiLoCo: {} -> {}",
        dense.before,
        dense.after
    );
    assert!(
        sparse.ratio > 50.0,
        "SparseLoCo sent only {:.1}x less than dense",
        sparse.ratio
    );
    assert!(
        (0.95..1.0).contains(&dense.ratio),
        "dense ratio {}",
        dense.ratio
    );
}

#[test]
fn a_diverged_peer_is_refused_and_keeps_its_error_feedback() {
    let m = Llama::new(small(), 1, &Device::Cpu).unwrap();
    let codec = CodecConfig::new(4096, 64, ValueBits::Two).unwrap();
    let c = Compressor::new(codec, 0.95).unwrap();
    let mut state = RoundState::new(&m, c, AggregationRule::WeightedMean).unwrap();
    let mut diloco = DilocoState::new(&m, 0.9).unwrap();
    let (name, var) = &m.params()[3];
    let poisoned = (var.as_tensor() * f64::NAN).unwrap();
    var.set(&poisoned).unwrap();
    let err = state.make_update(&m).err().unwrap();
    assert!(err.to_string().contains(name.as_str()), "{err}");
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(state.error_feedback.iter().flatten().all(|&e| e == 0.0));
    assert!(diloco.make_update(&m).is_err());
}

#[test]
fn dense_updates_round_trip_and_bad_ones_are_refused() {
    let m = Llama::new(small(), 2, &Device::Cpu).unwrap();
    let mut state = DilocoState::new(&m, 0.9).unwrap();
    let (_, var) = &m.params()[0];
    var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
    let update = state.make_update(&m).unwrap();
    let bytes = update.to_bytes();
    let parsed = DenseUpdate::from_bytes(&bytes).unwrap();
    let embed = var.dims().to_vec();
    assert_eq!(
        parsed.tensor("model.embed_tokens.weight", &embed).unwrap(),
        update.tensor("model.embed_tokens.weight", &embed).unwrap()
    );
    // Read in place, not copied: an exchange holds each dense update once.
    if cfg!(target_endian = "little") {
        let in_place = |v: &std::borrow::Cow<[f32]>| matches!(v, std::borrow::Cow::Borrowed(_));
        assert!(parsed.tensors.iter().all(|(_, _, v)| in_place(v)));
    }
    // Moved by one byte, the values are copied out and read the same.
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let moved = DenseUpdate::from_bytes(&shifted[1..]).unwrap();
    assert_eq!(moved, parsed);
    assert!(DenseUpdate::from_bytes(&bytes[..bytes.len() / 2]).is_err());
    assert!(DenseUpdate::from_bytes(b"not safetensors").is_err());
    // A NaN smuggled into the payload is caught on parse.
    let mut poisoned = bytes.clone();
    let at = poisoned.len() - 4;
    poisoned[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    let err = DenseUpdate::from_bytes(&poisoned).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    // Applying an update for another model names the problem.
    let wrong = DenseUpdate {
        tensors: vec![("model.norm.weight".into(), vec![3], vec![0.0; 3].into())],
    };
    let err = state.apply(&m, &[(&wrong, 1.0)], 0.7).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.embed_tokens.weight is missing"),
        "{err}"
    );
}
