//! The convergence benchmark's table, one row per run.

use std::fmt;

use super::{ConvergenceRow, algorithm_name};

/// A setting the algorithm does not use prints as `-`.
struct Opt<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => "-".fmt(f),
        }
    }
}

pub fn convergence_table_header() -> String {
    format!(
        "{:<11} {:>3} {:>6} {:>7} {:>5} {:>5} {:>5} {:>5} {:>4} {:>9} {:>4} {:>9} {:>7} {:>7} {:>7} {:>7} {:>11} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "algorithm",
        "H",
        "rounds",
        "lr",
        "warm",
        "α",
        "mom",
        "β",
        "k",
        "download",
        "agg k",
        "tokens",
        "val0",
        "val",
        "vs ddp",
        "vs all",
        "sent/peer",
        "vs dense",
        "dl/round",
        "vs upd",
        "wall s",
        "exch RSS",
        "peer RSS",
        "eval RSS"
    )
}

pub fn convergence_table_row(r: &ConvergenceRow) -> String {
    let s = &r.settings;
    let percent = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:+.1}%", 100.0 * v));
    format!(
        "{:<11} {:>3} {:>6} {:>7} {:>5} {:>5} {:>5} {:>5} {:>4} {:>9} {:>4} {:>9} {:>7.4} {:>7.4} {:>7} {:>7} {:>11} {:>8.1}x {:>9} {:>6.2}x {:>7.1} {:>6} MB {:>6} MB {:>9}",
        algorithm_name(r.algorithm),
        s.inner_steps,
        s.rounds,
        s.lr,
        s.warmup_steps,
        s.outer_lr,
        Opt(s.outer_momentum),
        Opt(s.error_feedback),
        Opt(s.k),
        Opt(s.download.map(|d| crate::run::value_name(&d))),
        Opt(s.aggregate_k),
        r.tokens,
        r.initial_validation_loss,
        r.final_validation_loss,
        percent(r.vs_ddp),
        percent(r.vs_all),
        r.bytes_sent_per_peer,
        r.ratio_vs_dense,
        r.download_per_round,
        r.download_vs_update,
        r.wall_s,
        r.exchange_peak_rss_bytes >> 20,
        r.peer_peak_rss_bytes >> 20,
        Opt(r
            .evaluator_peak_rss_bytes
            .map(|b| format!("{} MB", b >> 20)))
    )
}
