//! Scoring through the exchange, in process: peers (one of them cheating), an evaluator
//! and the operator's recorder, as a run on the clusters goes.

use std::path::Path;
use std::time::Duration;

use super::client::ExchangeClient;
use super::tests::{OPERATOR, client, options, reason, serve, token};
use super::{Identity, PeerId, Reason};
use crate::outer::Round;
use crate::roles::evaluate::{EvaluatorOptions, EvaluatorSummary, evaluate};
use crate::roles::train::{PeerOptions, PeerReport, train};
use crate::scoring::ScoringSpec;
use crate::scoring::ledger::{Signer, verify};
use crate::scoring::recorder::{self, Recorded};
use crate::scoring::rules::{Scoring, Standing};
use crate::testing::small_run;

const EVALUATOR: &str = "evaluator-token-0000";
const ROUNDS: u32 = 7;
const CHEAT_FROM: u32 = 1;

const ARGS: [&str; 10] = [
    "--inner-steps",
    "4",
    "--batch",
    "4",
    "--micro-batch",
    "4",
    "--aggregation",
    "median-norm",
    "--lr",
    "3e-3",
];

/// What the operator does while the run goes: records every round that is due and puts
/// its weights in force. Returns when `finished` says the evaluator is done and nothing
/// is left to record; the standing of every peer after each recorded round.
async fn operate(
    operator: &ExchangeClient,
    signer: &Signer,
    finished: impl Fn() -> bool,
) -> Vec<(Round, Scoring)> {
    let spec = ScoringSpec::default();
    let mut history = vec![];
    loop {
        // Whether the evaluator was done before the state is read: asked after, a report
        // sent in between would be missing from a state taken as final.
        let evaluated = finished();
        let state = operator.run_state().await.unwrap();
        match recorder::due_in(&state, 1) {
            Some((round, reports)) => {
                let Recorded {
                    line,
                    scoring,
                    weights,
                    ..
                } = recorder::record("ns/run", &spec, &state.ledger_head, round, reports, signer)
                    .unwrap();
                let key = signer.public_key();
                (operator.set_scored_weights(weights, Some((&line, &key))))
                    .await
                    .unwrap();
                history.push((round, scoring));
            }
            None if evaluated && state.done => return history,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Three peers, p2 flipping the sign of its updates from round [`CHEAT_FROM`].
fn spawn_peers(url: &str, dir: &Path) -> Vec<std::thread::JoinHandle<PeerReport>> {
    (0..3)
        .map(|p| {
            let (url, dir) = (url.to_owned(), dir.to_owned());
            std::thread::spawn(move || {
                let run = small_run(&dir.join(format!("p{p}-run")), &ARGS);
                let cheat = (p == 2).then(|| ("signflip".parse().unwrap(), Round(CHEAT_FROM)));
                let opts = PeerOptions {
                    exchange: url,
                    token: token(p),
                    bandwidth_mbps: None,
                    retry_for: Duration::from_secs(10),
                    heartbeat: Duration::from_millis(200),
                    tls: None,
                    checkpoint_dir: None,
                    adversary: cheat,
                    metrics_listen: None,
                };
                train(&run, opts).unwrap()
            })
        })
        .collect()
}

/// The run's one evaluator.
fn spawn_evaluator(url: &str, dir: &Path) -> std::thread::JoinHandle<EvaluatorSummary> {
    let (url, dir) = (url.to_owned(), dir.to_owned());
    std::thread::spawn(move || {
        let run = small_run(&dir.join("e0-run"), &ARGS);
        let opts = EvaluatorOptions {
            exchange: url,
            token: EVALUATOR.into(),
            retry_for: Duration::from_secs(10),
            tls: None,
            secret: vec![7; 32],
            run_uid: "uid".into(),
            eval_batches: 16,
            max_evaluated: 32,
        };
        evaluate(&run, opts).unwrap()
    })
}

/// Malformed, unsigned and misaddressed measurements, and a record that does not follow
/// the ledger's last (`first` is its first line), are refused with a reason.
async fn bad_input_is_refused(url: &str, operator: &ExchangeClient, signer: &Signer, first: &str) {
    let e0 = client(url, EVALUATOR, "");
    let (r, m) = reason(e0.put_measurements(Round(2), "not json").await.unwrap_err());
    assert_eq!(r, Reason::BadRequest);
    assert!(m.contains("not JSON"), "{m}");
    let unsigned = r#"{"evaluator":"e0","measured":{},"round":6,"seed":"00"}"#;
    let (_, m) = reason(e0.put_measurements(Round(6), unsigned).await.unwrap_err());
    assert!(m.contains("not signed"), "{m}");
    let p0 = client(url, &token(0), "");
    let (r, _) = reason(p0.put_measurements(Round(6), unsigned).await.unwrap_err());
    assert_eq!(r, Reason::Forbidden);
    let key = signer.public_key();
    let refused = operator.set_scored_weights([], Some((first, &key))).await;
    let (r, m) = reason(refused.unwrap_err());
    assert_eq!(r, Reason::BadRequest);
    assert!(m.contains("does not follow"), "{m}");
}

#[test]
fn a_sign_flipper_is_excluded_through_the_exchange_and_the_checkpoints_ledger_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &ARGS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _runtime = rt.enter();
    let mut opts = options(dir.path());
    opts.tokens.insert(EVALUATOR, Identity::Evaluator(0));
    opts.state_dir = Some(dir.path().join("state"));
    let settings = opts.settings.as_mut().unwrap();
    (settings.rounds, settings.min_peers) = (ROUNDS, 3);
    let url = rt.block_on(serve(run, opts));
    let peers = spawn_peers(&url, dir.path());
    let evaluator = spawn_evaluator(&url, dir.path());
    let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
    let operator = client(&url, OPERATOR, "");
    let history = rt.block_on(operate(&operator, &signer, || evaluator.is_finished()));
    for p in peers {
        p.join().unwrap();
    }
    let summary = evaluator.join().unwrap();
    let state = rt.block_on(operator.run_state()).unwrap();
    let e0 = &state.evaluators[0];
    assert_eq!((e0.evaluator.as_str(), e0.round), ("e0", ROUNDS - 1));
    assert!(e0.seconds.is_finite() && e0.seconds >= 0.0, "{e0:?}");
    let metrics = super::server::prometheus(&state);
    assert!(
        metrics.contains("starling_exchange_evaluation_seconds{evaluator=\"e0\"}"),
        "{metrics}"
    );
    assert_eq!(
        (summary.rounds_measured, summary.reports_refused),
        (ROUNDS, 0)
    );

    // Every round recorded; the cheater excluded within three rounds of starting, and
    // nobody else ever.
    let rounds: Vec<u32> = history.iter().map(|(r, _)| r.0).collect();
    assert_eq!(rounds, (0..ROUNDS).collect::<Vec<_>>());
    let out = |s: &Scoring, p: u32, r: Round| {
        let standing = s.peers[&PeerId::new(p)].standing(r);
        matches!(standing, Standing::Excluded | Standing::Banned)
    };
    let excluded_at = (history.iter())
        .find(|(r, s)| out(s, 2, *r))
        .map(|(r, _)| r.0);
    assert!(
        excluded_at.is_some_and(|r| r < CHEAT_FROM + 3),
        "excluded after round {excluded_at:?}: {history:#?}"
    );
    for (r, s) in &history {
        assert!(!out(s, 0, *r) && !out(s, 1, *r), "round {r}: {s:#?}");
    }

    // The exchange kept the ledger with its state and wrote it into the checkpoint.
    let checkpoint = dir.path().join(format!("exchange/round-{ROUNDS:06}"));
    let ledger = std::fs::read_to_string(checkpoint.join("ledger.jsonl")).unwrap();
    let key = std::fs::read_to_string(checkpoint.join("ledger.pub")).unwrap();
    let verified = verify(&ledger, &key).unwrap();
    assert!(verified.records >= 4, "{verified:?}");
    let kept = std::fs::read_to_string(dir.path().join("state/ledger.jsonl")).unwrap();
    assert_eq!(verify(&kept, &key).unwrap().records, ROUNDS as usize);

    // Bad measurements are refused, and a record that does not follow the ledger too.
    let first = ledger.lines().next().unwrap();
    rt.block_on(bad_input_is_refused(&url, &operator, &signer, first));
}
