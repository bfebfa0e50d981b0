//! Outer steps: θ before, a round's weighted updates, α, and θ after, for both
//! aggregation rules, chosen so that the order of operations shows in the bits.

use serde_json::{Value, json};

use super::invalid::run_json;
use super::{Files, compress, config, hex, pretty, pseudo_random};
use crate::codec::{AggregationRule, CodecConfig, Update, numel_of, outer_step};
use crate::exchange::PeerId;

/// Peers of the outer-step vectors: id, weight, seed, scale. Listed out of order on
/// purpose (the step goes in ascending numeric id: p3 before p10), with one excluded
/// (weight 0), one outsized update and weights that are not powers of two.
const OUTER_PEERS: [(&str, f32, u64, f32); 5] = [
    ("p10", 0.7, 14, 1.0),
    ("p0", 0.3, 11, 1.0),
    ("p2", 0.0, 12, 1.0),
    ("p7", 0.45, 15, 1.0),
    ("p3", 1.1, 13, 20.0),
];
const OUTER_ALPHA: f32 = 0.7;
/// Dense enough (half of every chunk) that most positions get three or four peers'
/// values, so the order of additions shows in the result.
const OUTER_TENSORS: [(&str, &[u64]); 2] = [("layers.0.weight", &[3, 50]), ("norm", &[])];

fn outer_config() -> CodecConfig {
    config(8, 4, 4)
}

/// `(peer, weight, update)` of the outer-step vectors, in file order.
fn outer_updates() -> Vec<(PeerId, f32, Update)> {
    let c = outer_config();
    OUTER_PEERS
        .iter()
        .map(|&(peer, weight, seed, scale)| {
            let tensors = OUTER_TENSORS
                .iter()
                .enumerate()
                .map(|(i, (name, shape))| compress(c, name, shape, seed * 10 + i as u64, scale))
                .collect();
            let update = Update::new(c, tensors).expect("update");
            (peer.parse().expect("peer id"), weight, update)
        })
        .collect()
}

fn theta_before() -> Vec<Vec<f32>> {
    OUTER_TENSORS
        .iter()
        .enumerate()
        .map(|(i, (_, shape))| {
            let n = numel_of(shape).expect("shape");
            pseudo_random(n, 100 + i as u64)
                .iter()
                .map(|v| v / 8.0)
                .collect()
        })
        .collect()
}

/// θ after the outer step of `rule`, with the updates applied in `order`.
fn step(rule: AggregationRule, order: &[(PeerId, f32, &Update)]) -> Vec<Vec<f32>> {
    let mut theta = theta_before();
    let mut scratch = Vec::new();
    for (i, (name, _)) in OUTER_TENSORS.iter().enumerate() {
        let inputs: Vec<_> = order
            .iter()
            .map(|(_, w, u)| (u.tensor(name).expect("tensor"), *w))
            .collect();
        outer_step(rule, &inputs, OUTER_ALPHA, &mut theta[i], &mut scratch).expect("step");
    }
    theta
}

fn in_peer_order(updates: &[(PeerId, f32, Update)]) -> Vec<(PeerId, f32, &Update)> {
    let mut order: Vec<_> = updates.iter().map(|(p, w, u)| (*p, *w, u)).collect();
    order.sort_by_key(|(p, _, _)| *p);
    order
}

pub fn outer_steps(files: &mut Files) -> Vec<Value> {
    let updates = outer_updates();
    let listed: Vec<Value> = updates
        .iter()
        .map(|(peer, weight, update)| {
            let file = format!("outer/{peer}.slco");
            files.insert(file.clone(), update.to_bytes());
            json!({"peer": peer.to_string(), "weight": hex(*weight), "weight_decimal": weight, "update": file})
        })
        .collect();
    let before = theta_before();
    [
        ("weighted-mean", AggregationRule::WeightedMean),
        ("median-norm", AggregationRule::MedianNormClipSelectedMean),
    ]
    .into_iter()
    .map(|(name, rule)| {
        let after = step(rule, &in_peer_order(&updates));
        let tensors: Vec<Value> = OUTER_TENSORS
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((tensor, shape), (b, a))| {
                let (b, a): (Vec<_>, Vec<_>) = (
                    b.iter().map(|v| hex(*v)).collect(),
                    a.iter().map(|v| hex(*v)).collect(),
                );
                json!({"name": tensor, "shape": shape, "before": b, "after": a})
            })
            .collect();
        let vector = json!({
            "rule": name,
            "alpha": hex(OUTER_ALPHA),
            "alpha_decimal": OUTER_ALPHA,
            "run": run_json(outer_config(), &OUTER_TENSORS),
            "updates": listed,
            "tensors": tensors,
        });
        let file = format!("outer/{name}.json");
        files.insert(file.clone(), pretty(&vector));
        json!({"name": name, "vector": file})
    })
    .collect()
}

#[test]
fn the_outer_step_vectors_tell_the_specified_order_from_near_misses() {
    let updates = outer_updates();
    let right = in_peer_order(&updates);
    // Peer ids sorted as strings: p0, p10, p2, p3, p7.
    let mut as_strings = right.clone();
    as_strings.sort_by_key(|(p, _, _)| p.to_string());
    for rule in [
        AggregationRule::WeightedMean,
        AggregationRule::MedianNormClipSelectedMean,
    ] {
        assert_ne!(step(rule, &right), step(rule, &as_strings), "{rule:?}");
    }
    // Σ wⱼ·dⱼ ÷ Σ wⱼ, the formula read literally.
    let mut literal = theta_before();
    for (i, (name, _)) in OUTER_TENSORS.iter().enumerate() {
        let (mut sum, total) = (
            vec![0.0f32; literal[i].len()],
            right.iter().map(|r| r.1).sum::<f32>(),
        );
        for (_, w, u) in &right {
            u.tensor(name)
                .unwrap()
                .for_each_entry(|at, v| sum[at] += w * v)
                .unwrap();
        }
        for (t, s) in literal[i].iter_mut().zip(&sum) {
            *t -= OUTER_ALPHA * (s / total);
        }
    }
    assert_ne!(step(AggregationRule::WeightedMean, &right), literal);
}
