//! What a round's step is made of, and so what every peer downloads to take it
//! ([`Download`]): every accepted update, at most G of them ([`gathered`]), or one
//! compressed aggregate that the exchange makes ([`Aggregator`]).
//!
//! A home link's download is what grows with the federation: with every update, a peer
//! of N downloads N − 1 of them each round. The aggregate is one object whatever N is;
//! what its compression leaves out stays in the exchange's error feedback and goes out
//! in a later round, as the peers' own error feedback does for their updates.

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::dense::{DenseUpdate, parse_dense, weighted_mean};
use super::{Finite, Llama, RoundError, fits};
use crate::codec::{AggregationRule, CodecConfig, Compressor, Update, aggregate};
use crate::run::{Algorithm, RunConfig};

pub use crate::run::Download;

/// A closed round's step as every replica takes it.
#[derive(Clone, Copy, Debug)]
pub enum Step<'a> {
    /// Accepted updates with their weights, in peer order.
    Updates(&'a [(&'a [u8], f32)]),
    /// The exchange's aggregate of the round, applied as it is.
    Aggregate(&'a [u8]),
}

impl<'a> Step<'a> {
    /// The step of a round that has `aggregate`, or else takes `updates`.
    pub fn of(aggregate: Option<&'a [u8]>, updates: &'a [(&'a [u8], f32)]) -> Self {
        match aggregate {
            Some(bytes) => Step::Aggregate(bytes),
            None => Step::Updates(updates),
        }
    }
}

/// Of a round's accepted updates (`(peer, weight)`), the ones its step takes under
/// [`Download::Gather`]: the `limit` with the highest weight. Equal weights (every peer
/// before scoring has weighed anyone) are ordered by a draw from `draw`, the run's seed
/// and the round, so over rounds every peer's work is taken. Weight 0 takes no part.
pub fn gathered<P: Ord + Copy>(entries: &[(P, f32)], limit: u32, draw: u64) -> BTreeSet<P> {
    let mut live: Vec<(P, f32)> = entries.iter().copied().filter(|(_, w)| *w > 0.0).collect();
    live.sort_by_key(|(p, _)| *p);
    live.shuffle(&mut StdRng::seed_from_u64(draw));
    live.sort_by(|a, b| b.1.total_cmp(&a.1)); // stable: the draw orders equal weights
    live.into_iter()
        .take(limit as usize)
        .map(|(p, _)| p)
        .collect()
}

/// The exchange's side of [`Download::Aggregate`]: it makes each round's aggregate, and
/// keeps what compression left out of it.
pub struct Aggregator {
    kind: Kind,
}

enum Kind {
    /// SparseLoCo: the round's aggregate under the run's rule, plus the residual of
    /// earlier rounds, compressed again.
    Compressed {
        rule: AggregationRule,
        /// Updates must fit this (the run's codec); the aggregate is made with
        /// `compressor`.
        updates: CodecConfig,
        compressor: Compressor,
        /// Per parameter, in model order.
        error_feedback: Vec<Vec<f32>>,
    },
    /// The dense algorithms: the weighted mean, exactly (one dense update's size).
    Mean,
}

impl Aggregator {
    pub fn new(run: &RunConfig, model: &Llama) -> Result<Self, RoundError> {
        let invalid = |e: crate::run::RunError| RoundError::Dense(e.to_string());
        let kind = match run.algorithm {
            Algorithm::SparseLoCo => Kind::Compressed {
                rule: run.aggregation(),
                updates: run.codec().map_err(invalid)?.config(),
                compressor: run.aggregate_codec().map_err(invalid)?,
                error_feedback: (model.params().iter())
                    .map(|(_, var)| vec![0.0; var.elem_count()])
                    .collect(),
            },
            Algorithm::DiLoCo | Algorithm::Ddp => Kind::Mean,
        };
        Ok(Self { kind })
    }

    /// The aggregate of `updates` (peer order, with weights) as the bytes every replica
    /// applies, or `None` when no update has positive weight (the round moves nothing;
    /// the residual waits for the next).
    pub fn aggregate(
        &mut self,
        model: &Llama,
        updates: &[(&[u8], f32)],
    ) -> Result<Option<Vec<u8>>, RoundError> {
        if !updates.iter().any(|(_, w)| *w > 0.0) {
            return Ok(None);
        }
        match &mut self.kind {
            Kind::Mean => {
                let parsed = parse_dense(updates)?;
                let refs: Vec<_> = parsed.iter().map(|(u, w)| (u, *w)).collect();
                Ok(weighted_mean(model, &refs)?.map(|m| m.to_bytes()))
            }
            Kind::Compressed {
                rule,
                updates: config,
                compressor,
                error_feedback,
            } => {
                let parsed = updates
                    .iter()
                    .map(|(b, w)| Ok((Update::from_bytes(b)?, *w)))
                    .collect::<Result<Vec<_>, RoundError>>()?;
                for (u, _) in &parsed {
                    fits(model, u, *config)?;
                }
                let mut tensors = Vec::with_capacity(error_feedback.len());
                let mut sum = Vec::new();
                for ((name, var), ef) in model.params().iter().zip(error_feedback.iter_mut()) {
                    let shape: Vec<u64> = var.dims().iter().map(|&d| d as u64).collect();
                    let inputs: Vec<_> = (parsed.iter())
                        .map(|(u, w)| (u.tensor(name).expect("layout checked"), *w))
                        .collect();
                    sum.resize(ef.len(), 0.0);
                    aggregate(*rule, &inputs, &mut sum)?;
                    let sum = Finite::new(&sum).map_err(|e| e.in_tensor(name))?;
                    tensors.push(compressor.compress(name, &shape, sum, ef)?);
                }
                Ok(Some(Update::new(compressor.config(), tensors)?.to_bytes()))
            }
        }
    }

    /// The codec an aggregate must fit, for the dense algorithms `None`.
    pub fn config(&self) -> Option<CodecConfig> {
        match &self.kind {
            Kind::Compressed { compressor, .. } => Some(compressor.config()),
            Kind::Mean => None,
        }
    }

    /// The residual, to keep with the exchange's state: a safetensors file of every
    /// tensor's error feedback (none for the dense algorithms).
    pub fn export(&self, model: &Llama) -> Vec<u8> {
        let tensors = match &self.kind {
            Kind::Compressed { error_feedback, .. } => (model.params().iter())
                .zip(error_feedback)
                .map(|((name, var), e)| (name.clone(), var.dims().to_vec(), e.as_slice().into()))
                .collect(),
            Kind::Mean => vec![],
        };
        DenseUpdate { tensors }.to_bytes()
    }

    /// Takes back a residual [`Self::export`] wrote.
    pub fn import(&mut self, model: &Llama, bytes: &[u8]) -> Result<(), RoundError> {
        let state = DenseUpdate::from_bytes(bytes)?;
        if let Kind::Compressed { error_feedback, .. } = &mut self.kind {
            for ((name, var), e) in model.params().iter().zip(error_feedback.iter_mut()) {
                e.copy_from_slice(state.tensor(name, var.dims())?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outer::Outer;
    use crate::testing::small_run;

    #[test]
    fn gathering_takes_the_highest_weights_and_draws_among_equals() {
        let named = |ps: &[u32]| ps.iter().copied().collect::<BTreeSet<u32>>();
        let weighted = [(0, 0.5), (1, 2.0), (2, 1.0), (3, 0.0), (4, 1.5)];
        assert_eq!(gathered(&weighted, 2, 9), named(&[1, 4]));
        assert_eq!(gathered(&weighted, 3, 9), named(&[1, 2, 4]));
        // Weight 0 takes no part, whatever the limit.
        assert_eq!(gathered(&weighted, 10, 9), named(&[0, 1, 2, 4]));
        // Equal weights: the draw decides, the same on every replica, and every peer
        // is taken in some round.
        let equal: Vec<(u32, f32)> = (0..6).map(|p| (p, 1.0)).collect();
        assert_eq!(gathered(&equal, 2, 5), gathered(&equal, 2, 5));
        let mut taken = BTreeSet::new();
        for draw in 0..20 {
            let round = gathered(&equal, 2, draw);
            assert_eq!(round.len(), 2);
            taken.extend(round);
        }
        assert_eq!(taken, named(&[0, 1, 2, 3, 4, 5]));
    }

    /// Round-0 updates of three peers of `run`, as the bytes that travel.
    fn updates(run: &crate::run::Run) -> Vec<Vec<u8>> {
        (0..3)
            .map(|p| {
                let model = run.initial_model().unwrap();
                let mut outer = Outer::new(&run.config, &model).unwrap();
                let schedule = run.config.schedule(crate::outer::Round(3));
                let mut inner =
                    crate::model::InnerOptimizer::new(&model, run.config.adamw(), schedule)
                        .unwrap();
                (outer.local_round(&model, &mut inner, &run.batches(p, 0), 2))
                    .unwrap()
                    .bytes
            })
            .collect()
    }

    #[test]
    fn what_an_aggregate_leaves_out_goes_out_later_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let run = small_run(dir.path(), &[]);
        let model = run.initial_model().unwrap();
        let bytes = updates(&run);
        let weighted: Vec<(&[u8], f32)> = bytes.iter().map(|b| (b.as_slice(), 1.0)).collect();
        let mut aggregator = Aggregator::new(&run.config, &model).unwrap();
        let config = aggregator.config().unwrap();
        let k = crate::run::AGGREGATE_K_FACTOR * run.config.k;
        assert_eq!(config.k(), k.min(run.config.chunk));
        // The same round's updates three times: what went out plus what is kept is
        // everything that came in (β = 1 forgets nothing).
        let mut sent = vec![Vec::new(); model.params().len()];
        for _ in 0..3 {
            let out = aggregator.aggregate(&model, &weighted).unwrap().unwrap();
            let largest = bytes.iter().map(Vec::len).max().unwrap();
            assert!(out.len() <= 3 * largest, "{} vs {largest}", out.len());
            let out = Update::from_bytes(&out).unwrap();
            for ((name, _), s) in model.params().iter().zip(&mut sent) {
                let t = out.tensor(name).unwrap();
                s.resize(t.numel(), 0.0);
                t.decode_add(1.0, s).unwrap();
            }
        }
        let parsed: Vec<Update> = bytes
            .iter()
            .map(|b| Update::from_bytes(b).unwrap())
            .collect();
        let Kind::Compressed { error_feedback, .. } = &aggregator.kind else {
            panic!("SparseLoCo compresses its aggregate");
        };
        for (i, (name, _)) in model.params().iter().enumerate() {
            let mut mean = vec![0.0; sent[i].len()];
            for u in &parsed {
                u.tensor(name)
                    .unwrap()
                    .decode_add(1.0 / 3.0, &mut mean)
                    .unwrap();
            }
            for ((s, e), m) in sent[i].iter().zip(&error_feedback[i]).zip(&mean) {
                assert!((s + e - 3.0 * m).abs() <= 1e-4 * (1.0 + m.abs()), "{name}");
            }
        }
        // The residual survives a restart of the exchange.
        let saved = aggregator.export(&model);
        let mut resumed = Aggregator::new(&run.config, &model).unwrap();
        resumed.import(&model, &saved).unwrap();
        assert_eq!(
            resumed.aggregate(&model, &weighted).unwrap(),
            aggregator.aggregate(&model, &weighted).unwrap()
        );
        // No positive weight: no step, and the residual waits.
        let excluded: Vec<(&[u8], f32)> = bytes.iter().map(|b| (b.as_slice(), 0.0)).collect();
        assert_eq!(aggregator.aggregate(&model, &excluded).unwrap(), None);
    }

    #[test]
    fn a_replica_refuses_an_aggregate_that_is_not_the_runs() {
        let dir = tempfile::tempdir().unwrap();
        let run = small_run(dir.path(), &[]);
        let model = run.initial_model().unwrap();
        let bytes = updates(&run);
        let mut outer = Outer::new(&run.config, &model).unwrap();
        // A single peer's update has the run's k, not the aggregate's.
        let err = (outer.apply_step(&model, None, Step::Aggregate(&bytes[0]), 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("this run uses"), "{err}");
        // A run that downloads updates takes no aggregate at all.
        let all = small_run(&dir.path().join("all"), &["--download", "all"]);
        let mut outer = Outer::new(&all.config, &model).unwrap();
        let mut aggregator = Aggregator::new(&run.config, &model).unwrap();
        let weighted = [(bytes[0].as_slice(), 1.0)];
        let aggregate = aggregator.aggregate(&model, &weighted).unwrap().unwrap();
        let err = (outer.apply_step(&model, None, Step::Aggregate(&aggregate), 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an aggregate"), "{err}");
    }
}
