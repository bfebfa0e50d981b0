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
    /// the measurements it covers; saved into `store` before it counts. A record that
    /// does not follow is refused (bad-request); one that cannot be saved is
    /// UNAVAILABLE, which the operator's client retries: the record was right, the
    /// storage was not there.
    pub(super) fn append(
        &mut self,
        line: &str,
        public_key: &str,
        store: Option<&Storage>,
    ) -> Result<(), tonic::Status> {
        if !self.public_key.is_empty() && public_key != self.public_key {
            return Err(bad("the ledger's public key cannot change".into()).into());
        }
        let record = Record::from_signed(line, public_key).map_err(bad)?;
        self.follows(&record)?;
        let mut lines = self.lines.clone();
        lines.push(line.to_owned());
        if let Some(store) = store {
            save(store, &lines, public_key).map_err(|e| {
                tonic::Status::unavailable(format!("the ledger could not be saved: {e}"))
            })?;
        }
        self.lines = lines;
        self.last = Some(record.round);
        self.public_key = public_key.to_owned();
        self.pending.retain(|(round, _), _| *round > record.round);
        Ok(())
    }

    /// Pending measurements, oldest round first.
    /// Whether `record` chains onto the last record.
    fn follows(&self, record: &Record) -> Result<(), Refusal> {
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
        Ok(())
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::ledger::Signer;
    use crate::scoring::{ScoringSpec, recorder};

    #[test]
    fn a_record_that_cannot_be_saved_is_unavailable_and_taken_once_storage_is_back() {
        let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
        let key = signer.public_key();
        let spec = ScoringSpec::default();
        let line = recorder::record("ns/run", &spec, "", Round(0), vec![], &signer)
            .unwrap()
            .line;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Storage::local(&state).unwrap();
        // The state directory is gone and a file stands in its place: nothing saves.
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::write(&state, "").unwrap();
        let mut ledger = Ledger::default();
        let e = ledger.append(&line, &key, Some(&store)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("could not be saved"), "{e}");
        assert_eq!(ledger.head().1, 0, "nothing counts until it is saved");
        // The storage back, the same record is taken.
        std::fs::remove_file(&state).unwrap();
        let store = Storage::local(&state).unwrap();
        ledger.append(&line, &key, Some(&store)).unwrap();
        assert_eq!(ledger.head().1, 1);
        // A record that does not follow is still refused as a bad request.
        let e = ledger.append(&line, &key, Some(&store)).unwrap_err();
        let refusal = Refusal::from_status(&e).unwrap();
        assert_eq!(refusal.reason, Reason::BadRequest, "{e}");
    }
}
