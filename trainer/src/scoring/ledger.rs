//! The scoring ledger: one signed record per scored round, chained by hash, from which
//! anyone can check every peer's score.
//!
//! A record holds what the evaluators measured (their revealed seeds and measurement
//! sets), the measurements combined, the constants the rules ran with, and every peer's
//! resulting row and the set aggregated next. It is written as one line of canonical JSON
//! (RFC 8785) and signed with the run's Ed25519 key over the same line without its
//! `signature`. [`verify`] checks the form, the signature and the chain of each line and
//! replays the state machine from the recorded measurements, naming the first record
//! that does not hold.

use std::collections::BTreeMap;

use crate::outer::Round;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ScoringSpec;
use super::canonical;
use super::rules::{Change, Measured, PeerScore, RoundInput, Scoring, step};
use crate::codec::median;
use crate::exchange::PeerId;

/// `previous` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One evaluator's measurements of one round, with the secret seed of its random slices
/// revealed once the round is over, signed by the evaluator's own key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvaluatorReport {
    pub evaluator: String,
    pub round: Round,
    /// SHA-256 of the global θ the round's updates were measured against.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub theta: String,
    pub seed: String,
    pub measured: BTreeMap<PeerId, Measured>,
    /// The evaluator's Ed25519 public key, lowercase hex; empty when unsigned (a report
    /// made in-process, never one an exchange accepted).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    /// Ed25519 over the report's canonical JSON without this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

impl EvaluatorReport {
    /// The report signed by `signer` (its key written in), as one line of canonical JSON.
    pub fn signed(mut self, signer: &Signer) -> String {
        self.public_key = signer.public_key();
        self.signature = String::new();
        signer.sign_value(&self)
    }

    /// A signed report's line: canonical, signed by the key it names.
    pub fn from_signed(line: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        if canonical::to_vec(&value) != line.as_bytes() {
            return Err("not in canonical form (RFC 8785)".into());
        }
        let report: Self =
            serde_json::from_value(value).map_err(|e| format!("not an evaluator report: {e}"))?;
        report.check_signature()?;
        Ok(report)
    }

    /// Whether the signature verifies with the key the report names.
    pub fn check_signature(&self) -> Result<(), String> {
        if self.signature.is_empty() || self.public_key.is_empty() {
            return Err("the report is not signed".into());
        }
        let key = unhex(&self.public_key).ok_or("the public key is not lowercase hex")?;
        let mut value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        check_signature(&mut value, &UnparsedPublicKey::new(&ED25519, key))
            .map_err(|e| format!("evaluator {}: {e}", self.evaluator))
    }
}

/// One scored round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub run: String,
    pub round: Round,
    /// SHA-256 of the previous record's line, or [`GENESIS`].
    pub previous: String,
    /// SHA-256 of the global state θ the round's updates were applied to.
    pub theta: String,
    pub constants: ScoringSpec,
    /// SHA-256 of the constants' canonical JSON.
    pub constants_hash: String,
    pub evaluators: Vec<EvaluatorReport>,
    /// The evaluators' measurements combined (see [`combine`]).
    pub measured: BTreeMap<PeerId, Measured>,
    /// Every peer's state after the round.
    pub peers: BTreeMap<PeerId, PeerScore>,
    /// The peers the next round aggregates.
    pub aggregate: Vec<PeerId>,
    /// Ed25519 over the record's line without this field, lowercase hex.
    #[serde(default)]
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LedgerError {
    #[error("the signing key is not an Ed25519 PKCS#8 document: {0}")]
    Key(String),
    #[error("record {line} (round {round}): {reason}")]
    Invalid {
        line: usize,
        round: String,
        reason: String,
    },
    #[error("the ledger is empty")]
    Empty,
}

/// SHA-256 of a ledger line, as the next record's `previous` names it.
pub fn line_hash(line: &str) -> String {
    sha256_hex(line.as_bytes())
}

impl Record {
    /// A signed ledger line: canonical, signed with `public_key` (hex).
    pub fn from_signed(line: &str, public_key: &str) -> Result<Self, String> {
        let key = unhex(public_key).ok_or("the public key is not lowercase hex")?;
        check_line(line, &UnparsedPublicKey::new(&ED25519, key))
    }

    /// The scoring state the record leaves.
    pub fn scoring(&self) -> Scoring {
        Scoring {
            peers: self.peers.clone(),
            aggregate: self.aggregate.clone(),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lowercase hex, as keys, hashes and signatures are written everywhere in a run.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex only: one signature, one spelling.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// SHA-256 of the constants, as records carry it.
pub fn constants_hash(spec: &ScoringSpec) -> String {
    let value = serde_json::to_value(spec).unwrap_or(Value::Null);
    sha256_hex(&canonical::to_vec(&value))
}

/// The run's signing key.
pub struct Signer(Ed25519KeyPair);

impl Signer {
    /// A new key, as the PKCS#8 document to keep in the run's Secret.
    pub fn generate() -> Result<Vec<u8>, LedgerError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|e| LedgerError::Key(e.to_string()))
    }

    pub fn from_pkcs8(document: &[u8]) -> Result<Self, LedgerError> {
        Ed25519KeyPair::from_pkcs8(document)
            .map(Self)
            .map_err(|e| LedgerError::Key(e.to_string()))
    }

    /// The public key, lowercase hex: what the run's status shows and verifiers take.
    pub fn public_key(&self) -> String {
        hex(self.0.public_key().as_ref())
    }

    /// `record` signed, as its ledger line (without the newline).
    pub fn sign(&self, record: &Record) -> String {
        self.sign_value(record)
    }

    /// `value` with its `signature` field set, as one line of canonical JSON.
    fn sign_value(&self, value: &impl Serialize) -> String {
        let mut value = serde_json::to_value(value).unwrap_or(Value::Null);
        let body = unsigned(&mut value);
        let signature = hex(self.0.sign(&body).as_ref());
        value["signature"] = Value::String(signature);
        String::from_utf8(canonical::to_vec(&value)).unwrap_or_default()
    }
}

/// The canonical bytes a signature covers: the record without `signature`.
fn unsigned(value: &mut Value) -> Vec<u8> {
    let mut body = value.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("signature");
    }
    canonical::to_vec(&body)
}

/// The next record after `previous` (the last line and state, or nothing for the first):
/// `measured` and the rows are computed here, so a record always replays.
pub struct Draft<'a> {
    pub run: &'a str,
    pub round: Round,
    pub theta: &'a str,
    pub constants: &'a ScoringSpec,
    pub evaluators: Vec<EvaluatorReport>,
}

impl Draft<'_> {
    /// The record and the scoring state it leaves.
    pub fn record(self, previous: Option<(&str, &Scoring)>) -> (Record, Scoring) {
        let (record, after, _) = self.record_with_changes(previous);
        (record, after)
    }

    /// [`Self::record`], and what changed for the peers.
    pub fn record_with_changes(
        self,
        previous: Option<(&str, &Scoring)>,
    ) -> (Record, Scoring, Vec<Change>) {
        let measured = combine(&self.evaluators);
        let empty = Scoring::default();
        let (previous_line, before) = previous.unwrap_or(("", &empty));
        let input = RoundInput {
            round: self.round,
            measured: measured.clone(),
        };
        let (after, changes) = step(self.constants, before, &input);
        let record = Record {
            run: self.run.to_owned(),
            round: self.round,
            previous: match previous {
                Some(_) => sha256_hex(previous_line.as_bytes()),
                None => GENESIS.to_owned(),
            },
            theta: self.theta.to_owned(),
            constants: self.constants.clone(),
            constants_hash: constants_hash(self.constants),
            evaluators: self.evaluators,
            measured,
            peers: after.peers.clone(),
            aggregate: after.aggregate.clone(),
            signature: String::new(),
        };
        (record, after, changes)
    }
}

/// Several evaluators' measurements of a round, combined peer by peer: a peer is missing
/// if every evaluator that lists it says so, invalid if at least half say so, and
/// otherwise scored with the median of each number among the evaluators that scored it
/// (copying: the median overlap, a replay if most say so, the most named peer).
pub fn combine(reports: &[EvaluatorReport]) -> BTreeMap<PeerId, Measured> {
    let mut by_peer: BTreeMap<PeerId, Vec<&Measured>> = BTreeMap::new();
    for r in reports {
        for (peer, m) in &r.measured {
            by_peer.entry(*peer).or_default().push(m);
        }
    }
    by_peer
        .into_iter()
        .map(|(peer, ms)| (peer, combine_one(&ms)))
        .collect()
}

fn combine_one(ms: &[&Measured]) -> Measured {
    use super::rules::{Copying, Evaluation};
    if ms.iter().all(|m| **m == Measured::Missing) {
        return Measured::Missing;
    }
    let invalid: Vec<&String> = (ms.iter())
        .filter_map(|m| match m {
            Measured::Invalid { reason } => Some(reason),
            _ => None,
        })
        .collect();
    if !invalid.is_empty() && 2 * invalid.len() >= ms.len() {
        return Measured::Invalid {
            reason: invalid[0].clone(),
        };
    }
    let scored: Vec<&Evaluation> = (ms.iter())
        .filter_map(|m| match m {
            Measured::Evaluated(e) => Some(e),
            _ => None,
        })
        .collect();
    if scored.is_empty() {
        return Measured::NotEvaluated;
    }
    let of = |f: fn(&Evaluation) -> f64| median(&scored.iter().map(|e| f(e)).collect::<Vec<_>>());
    let copies: Vec<&Copying> = scored.iter().filter_map(|e| e.copy.as_ref()).collect();
    let copy = (!copies.is_empty()).then(|| {
        let mut named: BTreeMap<PeerId, usize> = BTreeMap::new();
        for c in &copies {
            *named.entry(c.of).or_default() += 1;
        }
        let most = named
            .iter()
            .max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p)));
        Copying {
            of: most.map(|(p, _)| *p).unwrap_or(copies[0].of),
            overlap: of(|e| e.copy.as_ref().map_or(0.0, |c| c.overlap)),
            replay: 2 * copies.iter().filter(|c| c.replay).count() > scored.len(),
        }
    });
    Measured::Evaluated(Evaluation {
        score: of(|e| e.score),
        own_score: of(|e| e.own_score),
        sync_distance: of(|e| e.sync_distance),
        copy: copy.filter(|c| c.replay || c.overlap > 0.0),
    })
}

/// What a verified ledger holds.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub records: usize,
    pub first_round: Round,
    pub last_round: Round,
    /// SHA-256 of the last line: compare it with the run's status to know nothing was cut.
    pub head: String,
}

/// Checks every line of `ledger` (JSON Lines) against `public_key` (hex): canonical form,
/// signature, chain, constants, the combination of the evaluators' measurements and a
/// replay of the rules. Stops at the first record that does not hold.
pub fn verify(ledger: &str, public_key: &str) -> Result<Verified, LedgerError> {
    let key =
        unhex(public_key.trim()).ok_or_else(|| LedgerError::Key("not lowercase hex".into()))?;
    let key = UnparsedPublicKey::new(&ED25519, key);
    let mut state = Scoring::default();
    let (mut previous, mut first, mut last): (Option<String>, Option<Round>, Option<Round>) =
        (None, None, None);
    let mut count = 0;
    for (i, line) in ledger.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let fail = |round: String, reason: String| LedgerError::Invalid {
            line: i + 1,
            round,
            reason,
        };
        // The round as the line claims it, to name the record even when it fails.
        let claimed = (serde_json::from_str::<Value>(line).ok())
            .and_then(|v| v.get("round")?.as_u64())
            .map_or("?".to_owned(), |r| r.to_string());
        let record = check_line(line, &key).map_err(|reason| fail(claimed, reason))?;
        let round = record.round;
        let expected = previous
            .as_deref()
            .map_or(GENESIS.to_owned(), |p| sha256_hex(p.as_bytes()));
        let fail = |reason: String| fail(round.to_string(), reason);
        if record.previous != expected {
            return Err(fail(
                "does not follow the record before it (hash chain broken)".into(),
            ));
        }
        if last.is_some_and(|l| round <= l) {
            return Err(fail(format!(
                "comes after round {}",
                last.unwrap_or_default()
            )));
        }
        state = replay(&record, &state).map_err(fail)?;
        first.get_or_insert(round);
        last = Some(round);
        previous = Some(line.to_owned());
        count += 1;
    }
    match (first, last, previous) {
        (Some(first_round), Some(last_round), Some(line)) => Ok(Verified {
            records: count,
            first_round,
            last_round,
            head: sha256_hex(line.as_bytes()),
        }),
        _ => Err(LedgerError::Empty),
    }
}

/// One line's form and signature.
fn check_line(line: &str, key: &UnparsedPublicKey<Vec<u8>>) -> Result<Record, String> {
    let mut value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if canonical::to_vec(&value) != line.as_bytes() {
        return Err("not in canonical form (RFC 8785)".into());
    }
    check_signature(&mut value, key)?;
    serde_json::from_value(value).map_err(|e| format!("not a ledger record: {e}"))
}

/// Whether `value`'s `signature` verifies over the rest of it with `key`.
fn check_signature(value: &mut Value, key: &UnparsedPublicKey<Vec<u8>>) -> Result<(), String> {
    let signature = (value.get("signature").and_then(Value::as_str))
        .and_then(unhex)
        .ok_or("no signature in lowercase hex")?;
    key.verify(&unsigned(value), &signature)
        .map_err(|_| "the signature does not verify with this public key".to_owned())
}

/// The state after `record`, if its numbers are the ones its measurements give.
fn replay(record: &Record, before: &Scoring) -> Result<Scoring, String> {
    if record.constants_hash != constants_hash(&record.constants) {
        return Err("its constants do not hash to constantsHash".into());
    }
    for report in &record.evaluators {
        if report.round != record.round {
            return Err(format!(
                "evaluator {} reports round {}",
                report.evaluator, report.round
            ));
        }
        if !report.public_key.is_empty() {
            report.check_signature()?;
        }
    }
    if combine(&record.evaluators) != record.measured {
        return Err("its evaluators' measurements do not combine to what it records".into());
    }
    let input = RoundInput {
        round: record.round,
        measured: record.measured.clone(),
    };
    let (after, _) = step(&record.constants, before, &input);
    if let Some((peer, _)) = (after.peers.iter()).find(|(p, s)| record.peers.get(p) != Some(*s)) {
        return Err(format!(
            "replaying the rules gives {peer} another row than recorded"
        ));
    }
    if after.peers.len() != record.peers.len() || after.aggregate != record.aggregate {
        return Err("replaying the rules gives another aggregate than recorded".into());
    }
    Ok(after)
}

#[cfg(test)]
mod tests;
