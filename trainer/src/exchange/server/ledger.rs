//! What the exchange keeps for the run's scoring: the evaluators' signed measurements of
//! closed rounds until the operator records them, and the ledger of those records. The
//! ledger is kept with the global state, so a restarted operator or exchange loses
//! nothing, and written into every checkpoint beside its public key.

use std::collections::BTreeMap;

use super::{ExchangeError, proto};
use crate::exchange::storage::Storage;
use crate::exchange::{Reason, Refusal};
use crate::outer::Round;
use crate::scoring::ledger::{EvaluatorReport, GENESIS, Record, line_hash};

/// The ledger, in the exchange's storage and in every checkpoint: one signed record per line.
pub const LEDGER_FILE: &str = "ledger.jsonl";
/// The key that verifies it, lowercase hex.
pub const PUBLIC_KEY_FILE: &str = "ledger.pub";

#[derive(Default)]
pub(super) struct Ledger {
    lines: Vec<String>,
    /// The last record's round.
    last: Option<Round>,
    public_key: String,
    /// Evaluators' report lines by round and evaluator, for rounds after `last`.
    pending: BTreeMap<(Round, String), String>,
}

fn bad(message: String) -> Refusal {
    Refusal::new(Reason::BadRequest, message)
}

impl Ledger {
    /// The ledger saved in `store`, or an empty one.
    pub(super) fn load(store: Option<&Storage>) -> Result<Self, ExchangeError> {
        let Some(store) = store else {
            return Ok(Self::default());
        };
        let read = |key| super::persist::read(store, key);
        let Some(text) = read(LEDGER_FILE)? else {
            return Ok(Self::default());
        };
        let text = String::from_utf8_lossy(&text);
        let public_key = read(PUBLIC_KEY_FILE)?.unwrap_or_default();
        let public_key = String::from_utf8_lossy(&public_key).trim().to_owned();
        let mut ledger = Self {
            public_key,
            ..Self::default()
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            let record = Record::from_signed(line, &ledger.public_key)
                .map_err(|message| super::persist::resume_error(store, LEDGER_FILE, &message))?;
            ledger.last = Some(record.round);
            ledger.lines.push(line.to_owned());
        }
        tracing::info!(records = ledger.lines.len(), "resumed the scoring ledger");
        Ok(ledger)
    }

    /// Keeps `evaluator`'s signed report of the closed `round` (before `open`).
    pub(super) fn measured(
        &mut self,
        evaluator: &str,
        open: Round,
        m: &proto::Measurements,
    ) -> Result<(), Refusal> {
        let round = Round(m.round);
        let report = EvaluatorReport::from_signed(&m.report).map_err(bad)?;
        if report.evaluator != evaluator {
            return Err(bad(format!(
                "the report is {}'s, not the caller's ({evaluator})",
                report.evaluator
            )));
        }
        if report.round != round {
            return Err(bad(format!(
                "the report is of round {}, not {round}",
                report.round
            )));
        }
        if round >= open {
            return Err(bad(format!("round {round} has not closed")));
        }
        if self.last.is_some_and(|last| round <= last) {
            return Err(bad(format!("round {round} is already in the ledger")));
        }
        self.pending
            .insert((round, evaluator.to_owned()), m.report.clone());
        Ok(())
    }

    /// Appends the operator's signed `line` (it must follow the last record) and drops
    /// the measurements it covers; saved into `store` before it counts.
    pub(super) fn append(
        &mut self,
        line: &str,
        public_key: &str,
        store: Option<&Storage>,
    ) -> Result<(), Refusal> {
        if !self.public_key.is_empty() && public_key != self.public_key {
            return Err(bad("the ledger's public key cannot change".into()));
        }
        let record = Record::from_signed(line, public_key).map_err(bad)?;
        let expected = self
            .lines
            .last()
            .map_or(GENESIS.to_owned(), |l| line_hash(l));
        if record.previous != expected || self.last.is_some_and(|l| record.round <= l) {
            return Err(bad(format!(
                "the record of round {} does not follow the ledger's last record",
                record.round
            )));
        }
        let mut lines = self.lines.clone();
        lines.push(line.to_owned());
        if let Some(store) = store {
            save(store, &lines, public_key).map_err(|e| Refusal::new(Reason::BadRequest, e))?;
        }
        self.lines = lines;
        self.last = Some(record.round);
        self.public_key = public_key.to_owned();
        self.pending.retain(|(round, _), _| *round > record.round);
        Ok(())
    }

    /// Pending measurements, oldest round first.
    pub(super) fn measurements(&self) -> Vec<proto::Measurements> {
        (self.pending.iter())
            .map(|((round, _), report)| proto::Measurements {
                round: round.0,
                report: report.clone(),
            })
            .collect()
    }

    pub(super) fn head(&self) -> (&str, u32) {
        let head = self.lines.last().map_or("", String::as_str);
        (head, self.lines.len() as u32)
    }

    /// The ledger and its key as a checkpoint carries them; `None` before any record.
    pub(super) fn snapshot(&self) -> Option<(String, String)> {
        (!self.lines.is_empty()).then(|| (self.lines.join("\n") + "\n", self.public_key.clone()))
    }
}

/// Writes the ledger and its key into `store`.
fn save(store: &Storage, lines: &[String], public_key: &str) -> Result<(), String> {
    let key = format!("{public_key}\n").into_bytes();
    super::persist::write(store, PUBLIC_KEY_FILE, key)?;
    super::persist::write(store, LEDGER_FILE, (lines.join("\n") + "\n").into_bytes())
}
