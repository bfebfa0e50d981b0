//! `starling-trainer bench adversaries`: a scored federation (see [`super::simulate`])
//! with four honest peers and one adversary of each kind in turn, cheating from round 3:
//! when it was excluded, and what it cost the model against an all-honest run of the
//! same seed.

use std::time::Instant;

use serde::Serialize;

use super::ScoringSpec;
use super::adversary::Adversary;
use super::simulate::{Outcome, Scenario, simulate};
use crate::run::{Run, RunConfig};

/// One adversary kind's outcome.
#[derive(Debug, Serialize)]
pub struct AdversaryRow {
    pub kind: String,
    /// The round after which it stood excluded or banned, if it did.
    pub excluded_at_round: Option<u32>,
    /// The first round after which it had no weight in the next aggregate.
    pub weightless_at_round: Option<u32>,
    pub final_val_loss: f32,
    pub honest_val_loss: f32,
    /// final / honest.
    pub loss_ratio: f32,
    /// Honest peers ever excluded or banned (should be none).
    pub honest_excluded: Vec<String>,
    /// The largest index overlap between honest peers' updates in any round.
    pub max_honest_overlap: f64,
    pub wall_s: f64,
}

#[derive(clap::Args, Debug)]
pub struct AdversaryBench {
    /// Adversary kinds to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "noise,scale:20,signflip,zero,copy:p0,copy:p0:noisy,replay,stale,offslice,frozen,scale:5"
    )]
    pub kinds: Vec<Adversary>,
    /// Where the data is prepared.
    #[arg(long, default_value = ".starling/bench-adversaries")]
    pub work_dir: std::path::PathBuf,
    /// A model `config.json`; the tiny preset by default.
    #[arg(long)]
    pub model_config: Option<std::path::PathBuf>,
    /// Peers, the last one the adversary.
    #[arg(long, default_value_t = 5)]
    pub peers: u32,
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    #[arg(long, default_value_t = 3)]
    pub cheat_from: u32,
    #[arg(long, default_value_t = 5)]
    pub inner_steps: u32,
    #[arg(long, default_value_t = 4)]
    pub batch: u32,
    #[arg(long, default_value_t = 64)]
    pub sequence_length: u32,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Sequences per scored update, half random and half the peer's own.
    #[arg(long, default_value_t = 16)]
    pub eval_rows: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl AdversaryBench {
    /// The all-honest run, then every kind, calling `report` as each row is ready.
    pub fn run(&self, mut report: impl FnMut(&AdversaryRow)) -> anyhow::Result<Vec<AdversaryRow>> {
        let run = self.load()?;
        let honest = self.simulate(&run, None)?.0;
        let mut rows = vec![];
        for kind in &self.kinds {
            let (outcome, wall_s) = self.simulate(&run, Some(kind.clone()))?;
            let peak_overlap = outcome
                .rounds
                .iter()
                .map(|r| r.honest_overlap)
                .fold(0.0, f64::max);
            let row = AdversaryRow {
                kind: kind.to_string(),
                excluded_at_round: outcome.excluded_at_round,
                weightless_at_round: outcome.weightless_at_round,
                final_val_loss: outcome.final_validation_loss,
                honest_val_loss: honest.final_validation_loss,
                loss_ratio: outcome.final_validation_loss / honest.final_validation_loss,
                honest_excluded: outcome
                    .honest_excluded
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                max_honest_overlap: peak_overlap,
                wall_s,
            };
            report(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    fn simulate(&self, run: &Run, adversary: Option<Adversary>) -> anyhow::Result<(Outcome, f64)> {
        let scenario = Scenario {
            adversary,
            cheat_from: self.cheat_from,
            rounds: self.rounds,
            eval_rows: self.eval_rows,
            spec: ScoringSpec::default(),
        };
        let start = Instant::now();
        let outcome = simulate(run, &scenario, |r| {
            tracing::info!(
                round = r.round,
                validation_loss = r.validation_loss,
                aggregate = r.aggregate.len(),
                adversary = ?r.adversary,
                "round scored"
            );
        })?;
        Ok((outcome, start.elapsed().as_secs_f64()))
    }

    /// The run every kind trains: SparseLoCo with median-norm aggregation (the rule
    /// scoring runs with), on the tiny preset unless told otherwise.
    fn load(&self) -> anyhow::Result<Run> {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            run: RunConfig,
        }
        let model_config =
            crate::bench::model_config(&self.work_dir, self.model_config.as_deref())?;
        let args = [
            ("--model-config", model_config.display().to_string()),
            ("--aggregation", "median-norm".into()),
            ("--seed", self.seed.to_string()),
            ("--max-peers", self.peers.to_string()),
            ("--inner-steps", self.inner_steps.to_string()),
            ("--batch", self.batch.to_string()),
            ("--micro-batch", self.batch.to_string()),
            ("--sequence-length", self.sequence_length.to_string()),
            ("--lr", self.lr.to_string()),
        ];
        let argv = std::iter::once("bench".to_owned())
            .chain(args.into_iter().flat_map(|(f, v)| [f.to_owned(), v]));
        Ok(Flags::try_parse_from(argv)?
            .run
            .load(&self.work_dir.join("data"))?)
    }
}

pub fn adversary_table_header() -> String {
    format!(
        "{:<10} {:>9} {:>10} {:>8} {:>8} {:>7} {:>9} {:>8} {:>7}",
        "kind",
        "excluded",
        "weightless",
        "val",
        "honest",
        "ratio",
        "honest ex",
        "overlap",
        "wall s"
    )
}

pub fn adversary_table_row(r: &AdversaryRow) -> String {
    let round = |r: Option<u32>| r.map_or("never".to_owned(), |r| format!("round {r}"));
    format!(
        "{:<10} {:>9} {:>10} {:>8.4} {:>8.4} {:>7.3} {:>9} {:>8.3} {:>7.1}",
        r.kind,
        round(r.excluded_at_round),
        round(r.weightless_at_round),
        r.final_val_loss,
        r.honest_val_loss,
        r.loss_ratio,
        if r.honest_excluded.is_empty() {
            "none".to_owned()
        } else {
            r.honest_excluded.join(",")
        },
        r.max_honest_overlap,
        r.wall_s
    )
}
