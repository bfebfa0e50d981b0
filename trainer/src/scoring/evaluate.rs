//! What an evaluator measures of each peer's update in a round, as Templar's Gauntlet
//! does: is it valid, does it lower the loss when applied alone (on a random slice the
//! peer could not train on, and on the peer's own data), was the peer in sync, and did it
//! copy. The numbers feed [`super::rules::step`].

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::rules::{Copying, Evaluation, Measured};
use crate::codec::{CodecConfig, Update, clip_factor, median};
use crate::data::{Assignment, Batch};
use crate::exchange::PeerId;
use crate::model::Llama;
use crate::outer::{Round, RoundError, fits, write};

/// Share of the outer learning rate an update is applied with when scored alone.
const ALONE: f32 = 0.2;
/// An update whose norm exceeds this many times the round's median, for most tensors, is
/// invalid rather than clipped.
const OUTLIER: f64 = 10.0;
/// EMA factor of the typical step at the probe positions.
const TYPICAL_ALPHA: f32 = 0.2;
/// Rounds of accepted updates a replay is looked for in.
const REPLAY_ROUNDS: usize = 8;

/// One peer's submission as the evaluator sees it.
pub struct Submission {
    pub peer: PeerId,
    pub bytes: Vec<u8>,
    /// The peer's θ at the run's probe positions ([`probe_positions`]).
    pub probe: Vec<f32>,
    /// The sequences the peer was assigned this round.
    pub own: Batch,
}

/// Two seeded positions per tensor, fixed for the run: where peers report their θ so
/// sync can be checked without shipping weights.
pub fn probe_positions(model: &Llama, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5052_4f42_4553);
    (model.params().iter().enumerate())
        .flat_map(|(t, (_, var))| {
            let n = var.elem_count();
            [(t, rng.random_range(0..n)), (t, rng.random_range(0..n))]
        })
        .collect()
}

/// The model's θ at the probe positions, reading only those values: what a peer sends
/// with its update.
pub fn probe_model(model: &Llama, positions: &[(usize, usize)]) -> Result<Vec<f32>, RoundError> {
    let params = model.params();
    (positions.iter())
        .map(|&(t, i)| {
            let (name, var) = &params[t];
            (var.as_tensor().flatten_all())
                .and_then(|f| f.narrow(0, i, 1))
                .and_then(|v| v.to_vec1::<f32>())
                .map(|v| v.into_iter().next().unwrap_or(f32::NAN))
                .map_err(|source| RoundError::Tensor {
                    tensor: name.clone(),
                    source,
                })
        })
        .collect()
}

/// SHA-256 of θ (model order, little-endian f32), lowercase hex: how a ledger names the
/// state a round was measured against.
pub fn theta_hash(theta: &[Vec<f32>]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = Vec::with_capacity(4 * 4096);
    for block in theta.iter().flat_map(|t| t.chunks(4096)) {
        buffer.clear();
        buffer.extend(block.iter().flat_map(|v| v.to_le_bytes()));
        ctx.update(&buffer);
    }
    super::ledger::hex(ctx.finish().as_ref())
}

/// The first `rows` sequences peer `p` was assigned for `round`: its own data, as
/// scoring measures it.
pub fn own_slice(run: &crate::run::Run, peer: PeerId, round: Round, rows: usize) -> Batch {
    let windows = run.assignment.peer_round(peer.index(), round.0);
    (run.assignment).batch(&run.shards.train, &windows[..rows.min(windows.len())])
}

/// `θ` at the probe positions.
pub fn probe(theta: &[Vec<f32>], positions: &[(usize, usize)]) -> Vec<f32> {
    positions.iter().map(|&(t, i)| theta[t][i]).collect()
}

/// An evaluator across rounds: its scratch model and what it remembers.
pub struct Evaluator {
    model: Llama,
    config: CodecConfig,
    outer_lr: f32,
    positions: Vec<(usize, usize)>,
    /// EMA of |θ_{r+1} − θ_r| at the probe positions.
    typical: Vec<f32>,
    /// Hashes of accepted updates, newest round last.
    accepted: VecDeque<HashSet<[u8; 32]>>,
    /// Each peer's kept positions (tensor, index) in the round measured last, and in
    /// the round before it (accepted updates only).
    measured: BTreeMap<PeerId, Kept>,
    previous: BTreeMap<PeerId, Kept>,
}

/// The positions an update keeps, as (tensor, index).
type Kept = BTreeSet<(usize, usize)>;

impl Evaluator {
    pub fn new(model: Llama, config: CodecConfig, outer_lr: f32, seed: u64) -> Self {
        let positions = probe_positions(&model, seed);
        Self {
            typical: vec![0.0; positions.len()],
            model,
            config,
            outer_lr,
            positions,
            accepted: VecDeque::new(),
            measured: BTreeMap::new(),
            previous: BTreeMap::new(),
        }
    }

    /// Measures every submission of a round against the global `theta` it was meant to
    /// be applied to; `random` is the evaluator's secret slice.
    pub fn measure(
        &mut self,
        theta: &[Vec<f32>],
        submissions: &[Submission],
        random: &Batch,
    ) -> Result<BTreeMap<PeerId, Measured>, RoundError> {
        let mut out = BTreeMap::new();
        let mut parsed = Vec::new();
        for s in submissions {
            match self.parse(&s.bytes) {
                Ok(u) => parsed.push((s, kept(&u), u)),
                Err(reason) => {
                    out.insert(s.peer, Measured::Invalid { reason });
                }
            }
        }
        let norms: Vec<Vec<f64>> = parsed.iter().map(|(_, _, u)| norms(u)).collect();
        let medians = column_medians(&norms);
        write(&self.model, theta)?;
        let base_random = self.model.batch_loss(random)?;
        for ((s, _, update), norms) in parsed.iter().zip(&norms) {
            if let Some(reason) = invalid(norms, &medians) {
                out.insert(s.peer, Measured::Invalid { reason });
                continue;
            }
            let base_own = {
                write(&self.model, theta)?;
                self.model.batch_loss(&s.own)?
            };
            self.apply_alone(theta, update, norms, &medians)?;
            let after_random = self.model.batch_loss(random)?;
            let after_own = self.model.batch_loss(&s.own)?;
            let evaluation = Evaluation {
                score: f64::from((base_random - after_random) / base_random),
                own_score: f64::from((base_own - after_own) / base_own),
                sync_distance: self.sync_distance(theta, &s.probe),
                copy: self.copying(s, &parsed),
            };
            out.insert(s.peer, Measured::Evaluated(evaluation));
        }
        self.measured = (parsed.into_iter())
            .map(|(s, kept, _)| (s.peer, kept))
            .collect();
        Ok(out)
    }

    /// The round closed: `before` became `after` with these accepted updates.
    pub fn observe(
        &mut self,
        before: &[Vec<f32>],
        after: &[Vec<f32>],
        accepted: &[(PeerId, &[u8])],
    ) {
        for ((t, i), typical) in self.positions.iter().zip(&mut self.typical) {
            let step = (after[*t][*i] - before[*t][*i]).abs();
            *typical = (1.0 - TYPICAL_ALPHA) * *typical + TYPICAL_ALPHA * step;
        }
        self.accepted
            .push_back(accepted.iter().map(|(_, b)| digest(b)).collect());
        while self.accepted.len() > REPLAY_ROUNDS {
            self.accepted.pop_front();
        }
        let mut measured = std::mem::take(&mut self.measured);
        measured.retain(|p, _| accepted.iter().any(|(a, _)| a == p));
        self.previous = measured;
    }

    fn parse(&self, bytes: &[u8]) -> Result<Update, String> {
        let update = Update::from_bytes(bytes).map_err(|e| e.to_string())?;
        fits(&self.model, &update, self.config).map_err(|e| e.to_string())?;
        Ok(update)
    }

    /// Writes θ − η·f·clip(decode(U)) into the scratch model.
    fn apply_alone(
        &self,
        theta: &[Vec<f32>],
        update: &Update,
        norms: &[f64],
        medians: &[f64],
    ) -> Result<(), RoundError> {
        let mut moved = theta.to_vec();
        for (((name, _), m), (norm, median)) in (self.model.params().iter())
            .zip(&mut moved)
            .zip(norms.iter().zip(medians))
        {
            let clip = clip_factor(*norm, *median);
            let tensor = update
                .tensor(name)
                .ok_or(RoundError::Dense(format!("no {name}")))?;
            tensor.decode_add(-self.outer_lr * ALONE * clip, m)?;
        }
        write(&self.model, &moved)
    }

    /// x: the interquartile mean over probe positions of |θ − probe| in typical steps.
    fn sync_distance(&self, theta: &[Vec<f32>], probe: &[f32]) -> f64 {
        if probe.len() != self.positions.len() {
            return f64::INFINITY;
        }
        let ours = self::probe(theta, &self.positions);
        let mut x: Vec<f64> = (ours.iter().zip(probe).zip(&self.typical))
            .map(|((a, b), t)| {
                let d = f64::from((a - b).abs());
                if d == 0.0 {
                    0.0
                } else {
                    d / f64::from(t.max(1e-12))
                }
            })
            .collect();
        x.sort_by(f64::total_cmp);
        let q = x.len() / 4;
        let middle = &x[q..x.len() - q];
        middle.iter().sum::<f64>() / middle.len().max(1) as f64
    }

    /// The worst copying of `s`: a replay of an accepted update, or the largest overlap
    /// with a same-round update received before it or another peer's previous update.
    fn copying(&self, s: &Submission, round: &[(&Submission, Kept, Update)]) -> Option<Copying> {
        let hash = digest(&s.bytes);
        if self.accepted.iter().any(|r| r.contains(&hash)) {
            return Some(Copying {
                of: s.peer,
                overlap: 1.0,
                replay: true,
            });
        }
        let mine = &round.iter().find(|(o, _, _)| o.peer == s.peer)?.1;
        let earlier = (round.iter())
            .take_while(|(o, _, _)| o.peer != s.peer)
            .map(|(o, kept, _)| (o.peer, kept));
        let before = (self.previous.iter()).filter(|(p, _)| **p != s.peer);
        earlier
            .chain(before.map(|(p, k)| (*p, k)))
            .map(|(of, theirs)| (of, overlap(mine, theirs)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, o)| *o > 0.0)
            .map(|(of, overlap)| Copying {
                of,
                overlap,
                replay: false,
            })
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().unwrap_or([0; 32])
}

/// Every kept position, as (tensor, index).
fn kept(update: &Update) -> Kept {
    let mut out = BTreeSet::new();
    for (t, tensor) in update.tensors().iter().enumerate() {
        let _ = tensor.for_each_entry(|at, _| {
            out.insert((t, at));
        });
    }
    out
}

/// Shared kept positions over kept positions: the mean over chunks of shared / k, every
/// chunk keeping k.
pub fn overlap(a: &Kept, b: &Kept) -> f64 {
    a.intersection(b).count() as f64 / a.len().max(1) as f64
}

fn norms(update: &Update) -> Vec<f64> {
    (update.tensors().iter())
        .map(|t| t.norm().unwrap_or(f64::INFINITY))
        .collect()
}

/// Per tensor, the median norm over the round's updates.
fn column_medians(rows: &[Vec<f64>]) -> Vec<f64> {
    let width = rows.first().map_or(0, Vec::len);
    (0..width)
        .map(|t| median(&rows.iter().map(|r| r[t]).collect::<Vec<_>>()))
        .collect()
}

/// Why an update that decodes is still invalid: all zero, or a norm outlier.
fn invalid(norms: &[f64], medians: &[f64]) -> Option<String> {
    if norms.iter().all(|n| *n == 0.0) {
        return Some("all zero".into());
    }
    let outliers = (norms.iter().zip(medians))
        .filter(|(n, m)| **n > OUTLIER * **m)
        .count();
    (2 * outliers > norms.len()).then(|| {
        format!(
            "norm above {OUTLIER}× the round's median in {outliers} of {} tensors",
            norms.len()
        )
    })
}

/// The evaluator's random slice for `round`: `rows` windows of the training tokens drawn
/// from `seed` (secret until the round is over), so peers cannot train on it.
pub fn random_slice(
    assignment: &Assignment,
    tokens: &[crate::data::Token],
    rows: usize,
    seed: u64,
    round: Round,
) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(round.0) << 32));
    let windows: Vec<u64> = (0..rows)
        .map(|_| rng.random_range(0..assignment.windows()))
        .collect();
    assignment.batch(tokens, &windows)
}
