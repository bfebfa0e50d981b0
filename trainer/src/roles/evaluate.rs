//! The `evaluate` role: one of a run's evaluators. It follows the run as a peer does (a
//! replica of the global state, advanced by every closed round with the same code) but
//! trains nothing: for each closed round it measures every peer's update against the θ
//! it was meant for ([`crate::scoring::evaluate`]), signs the measurements with a key of
//! its own and sends them to the exchange, then applies the round.
//!
//! Its random slices are drawn from a secret seed, HMAC-SHA256 of the run's scoring key,
//! the run's uid, the round and the evaluator's name, so no peer can train on them; the
//! seed is revealed in the report, once the round is over.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::train::{PeerError, Replica};
use crate::exchange::client::{ClientOptions, ExchangeClient, RoundResult};
use crate::exchange::{PeerId, Reason};
use crate::outer::{Round, read};
use crate::run::Run;
use crate::scoring::evaluate::{Evaluator, Submission, own_slice, random_slice, theta_hash};
use crate::scoring::ledger::{EvaluatorReport, Signer, hex};
use crate::scoring::rules::Measured;

/// How this evaluator reaches the exchange and what it measures with.
#[derive(Clone, Debug)]
pub struct EvaluatorOptions {
    pub exchange: String,
    pub token: String,
    pub retry_for: Duration,
    /// What verifies an `https://` exchange.
    pub tls: Option<crate::exchange::tls::ClientTls>,
    /// The run's scoring key: the secret its random slices are drawn from.
    pub secret: Vec<u8>,
    /// The run's uid, so two runs with one key draw different slices.
    pub run_uid: String,
    /// Sequences per scored update: half random, half the peer's own.
    pub eval_batches: u32,
    /// Updates scored per round; beyond it, those scored least recently first.
    pub max_evaluated: u32,
}

/// What an evaluator did.
#[derive(Debug, Default)]
pub struct EvaluatorSummary {
    pub name: String,
    pub rounds_measured: u32,
    pub reports_refused: u32,
}

/// Follows `run` to its end, measuring every round.
pub fn evaluate(run: &Run, opts: EvaluatorOptions) -> Result<EvaluatorSummary, PeerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _runtime = rt.enter();
    let client = ExchangeClient::new(ClientOptions {
        url: opts.exchange.clone(),
        token: opts.token.clone(),
        fingerprint: run.fingerprint.clone(),
        bandwidth_mbps: None,
        retry_for: opts.retry_for,
        tls: opts.tls.clone(),
    })?;
    let (name, open, rounds) = rt.block_on(client.join_as())?;
    tracing::info!(evaluator = %name, open_round = open.0, rounds = rounds.0, "joined the run");
    let signer = Signer::from_pkcs8(&Signer::generate().map_err(key_error)?).map_err(key_error)?;
    let mut me = Follower {
        replica: Replica::new(run, rounds)?,
        evaluator: Evaluator::new(
            run.initial_model()?,
            run.config.codec()?.config(),
            run.config.outer_lr,
            run.config.seed,
        ),
        last_evaluated: BTreeMap::new(),
        summary: EvaluatorSummary {
            name,
            ..EvaluatorSummary::default()
        },
        signer,
        opts,
    };
    let mut round = match open > Round(0) {
        true => me.resync(&rt, &client)?,
        false => Round(0),
    };
    let mut rounds = rounds;
    while round < rounds {
        let result = match rt.block_on(client.fetch_round(round)) {
            Ok(result) => result,
            Err(e) => match e.refusal().map(|r| r.reason) {
                Some(Reason::Resync) => {
                    round = me.resync(&rt, &client)?;
                    continue;
                }
                Some(Reason::RunDone) => break,
                _ => return Err(e.into()),
            },
        };
        rounds = result.rounds;
        // θ_r, read once: measured against, then the `before` of the round's step.
        let theta = read(&me.replica.model)?;
        let report = me.measure(round, &result, &theta)?;
        match rt.block_on(client.put_measurements(round, &report)) {
            Ok(()) => me.summary.rounds_measured += 1,
            Err(e) => {
                // The round stays unscored; the run goes on.
                tracing::warn!(round = round.0, error = %e, "measurements not taken");
                me.summary.reports_refused += 1;
            }
        }
        me.apply(&result, &theta)?;
        round = round.next();
    }
    tracing::info!(summary = ?me.summary, "run finished");
    Ok(me.summary)
}

/// Of the peers that `sent`, the ones to score: all of them, or `max` of them, those
/// scored least recently first (never scored before all others), ties broken by a draw
/// from `seed`.
fn choose(
    sent: &[PeerId],
    last_evaluated: &BTreeMap<PeerId, Round>,
    max: u32,
    seed: u64,
) -> Vec<PeerId> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut peers: Vec<(Option<Round>, u64, PeerId)> = (sent.iter())
        .map(|p| (last_evaluated.get(p).copied(), rng.random(), *p))
        .collect();
    peers.sort();
    peers.truncate(max.max(1) as usize);
    peers.into_iter().map(|(_, _, p)| p).collect()
}

fn key_error(e: crate::scoring::ledger::LedgerError) -> PeerError {
    PeerError::Runtime(std::io::Error::other(e.to_string()))
}

/// An evaluator at work.
struct Follower<'a> {
    replica: Replica<'a>,
    evaluator: Evaluator,
    /// The round each peer was last scored in.
    last_evaluated: BTreeMap<PeerId, Round>,
    summary: EvaluatorSummary,
    signer: Signer,
    opts: EvaluatorOptions,
}

impl Follower<'_> {
    fn resync(
        &mut self,
        rt: &tokio::runtime::Runtime,
        client: &ExchangeClient,
    ) -> Result<Round, PeerError> {
        let (_, bytes) = rt.block_on(client.fetch_state())?;
        let replica = &mut self.replica;
        let round = replica.outer.import(&replica.model, &bytes)?;
        tracing::info!(round = round.0, "synced the global state");
        Ok(round)
    }

    /// The secret seed of `round`'s random slice, as revealed, and as drawn from.
    fn seed(&self, round: Round) -> (String, u64) {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.opts.secret);
        let message = format!("{}/{}/{}", self.opts.run_uid, round.0, self.summary.name);
        let tag = ring::hmac::sign(&key, message.as_bytes());
        let bytes = tag.as_ref();
        let hex = hex(bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&bytes[..8]);
        (hex, u64::from_le_bytes(first))
    }

    /// Measures `round`'s updates against this replica's θ: the signed report.
    fn measure(
        &mut self,
        round: Round,
        result: &RoundResult,
        theta: &[Vec<f32>],
    ) -> Result<String, PeerError> {
        let run = self.replica.run;
        let half = (self.opts.eval_batches / 2).max(1) as usize;
        let chosen = self.choose(round, result);
        let submissions: Vec<Submission> = (result.entries.iter())
            .filter(|e| chosen.contains(&e.peer))
            .map(|e| Submission {
                peer: e.peer,
                bytes: e.bytes.clone(),
                probe: e.probe.clone(),
                own: own_slice(run, e.peer, round, half),
            })
            .collect();
        let (revealed, seed) = self.seed(round);
        let random = random_slice(&run.assignment, &run.shards.train, half, seed, round);
        let started = std::time::Instant::now();
        let mut measured = self.evaluator.measure(theta, &submissions, &random)?;
        for e in &result.entries {
            measured.entry(e.peer).or_insert(Measured::NotEvaluated);
        }
        for p in &result.roster {
            measured.entry(*p).or_insert(Measured::Missing);
        }
        tracing::info!(
            evaluator = %self.summary.name,
            round = round.0,
            scored = submissions.len(),
            peers = measured.len(),
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "round measured"
        );
        let report = EvaluatorReport {
            evaluator: self.summary.name.clone(),
            round,
            theta: theta_hash(theta),
            seed: revealed,
            measured,
            public_key: String::new(),
            signature: String::new(),
        };
        Ok(report.signed(&self.signer))
    }

    /// The peers to score this round (see [`choose`]), remembered as scored.
    fn choose(&mut self, round: Round, result: &RoundResult) -> Vec<PeerId> {
        let sent: Vec<PeerId> = result.entries.iter().map(|e| e.peer).collect();
        let seed = self.replica.run.config.seed ^ u64::from(round.0);
        let chosen = choose(&sent, &self.last_evaluated, self.opts.max_evaluated, seed);
        for p in &chosen {
            self.last_evaluated.insert(*p, round);
        }
        chosen
    }

    /// The outer step every replica takes with the round, from `before` (θ_r).
    fn apply(&mut self, result: &RoundResult, before: &[Vec<f32>]) -> Result<(), PeerError> {
        self.replica.apply_round(result)?;
        let after = read(&self.replica.model)?;
        let accepted: Vec<(PeerId, &[u8])> = (result.entries.iter())
            .map(|e| (e.peer, e.bytes.as_slice()))
            .collect();
        self.evaluator.observe(before, &after, &accepted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_limit_the_peers_scored_least_recently_are_scored() {
        let p = PeerId::new;
        let sent: Vec<PeerId> = (0..5).map(p).collect();
        let none = BTreeMap::new();
        assert_eq!(choose(&sent, &none, 32, 1).len(), 5);
        let mut last = BTreeMap::from([(p(0), Round(3)), (p(1), Round(2)), (p(2), Round(3))]);
        // p3 and p4 were never scored; then p1, scored longest ago.
        let mut chosen = choose(&sent, &last, 3, 1);
        chosen.sort();
        assert_eq!(chosen, [p(1), p(3), p(4)]);
        // Over rounds, everyone gets scored.
        let mut seen = std::collections::BTreeSet::new();
        for r in 4..7 {
            for q in choose(&sent, &last, 2, r) {
                last.insert(q, Round(r as u32));
                seen.insert(q);
            }
        }
        assert_eq!(seen.len(), 5);
    }
}
