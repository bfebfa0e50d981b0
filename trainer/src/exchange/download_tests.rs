//! What a peer downloads to take a round's step, in each download mode, and what an
//! evaluator gets beside it.

use std::time::Duration;

use super::Identity;
use super::client::RoundResult;
use super::tests::{OPERATOR, client, options, serve, token, update};
use crate::outer::{Round, read};
use crate::roles::train::Replica;
use crate::run::Run;
use crate::testing::small_run;

const EVALUATOR: &str = "evaluator-token-0000";

/// Three peers send their round-0 updates to an exchange of `run`; returns each peer's
/// view of the round, the evaluator's, the exchange's summary of it and the updates.
async fn one_round(
    run: Run,
    dir: &std::path::Path,
) -> (
    Vec<RoundResult>,
    RoundResult,
    super::proto::RoundSummary,
    Vec<Vec<u8>>,
) {
    let fp = run.fingerprint.clone();
    let updates: Vec<Vec<u8>> = (0..3).map(|p| update(&run, p)).collect();
    let mut opts = options(dir);
    opts.settings.as_mut().unwrap().min_peers = 3;
    opts.tokens.insert(EVALUATOR, Identity::Evaluator(0));
    let url = serve(run, opts).await;
    let peers: Vec<_> = (0..3).map(|p| client(&url, &token(p), &fp)).collect();
    for p in &peers {
        p.join().await.unwrap();
    }
    let rounds = peers
        .iter()
        .zip(&updates)
        .map(|(p, u)| p.exchange_round(Round(0), Some((u, 1.0))));
    let results: Vec<RoundResult> = futures::future::join_all(rounds)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let evaluator = client(&url, EVALUATOR, "");
    let seen = tokio::time::timeout(Duration::from_secs(60), evaluator.fetch_round(Round(0)))
        .await
        .unwrap()
        .unwrap();
    let summary = client(&url, OPERATOR, "").run_state().await.unwrap().recent[0].clone();
    (results, seen, summary, updates)
}

/// θ after round 0 as a peer of `run` computes it from what it downloaded.
fn stepped(run: &Run, result: &RoundResult) -> Vec<Vec<f32>> {
    let mut replica = Replica::new(run, Round(3)).unwrap();
    replica.apply_round(result).unwrap();
    read(&replica.model).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_downloads_one_aggregate_and_an_evaluator_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let again = small_run(&dir.path().join("again"), &[]);
    let (results, seen, summary, updates) = one_round(run, dir.path()).await;
    let largest = updates.iter().map(Vec::len).max().unwrap();
    for r in &results {
        assert!(r.entries.is_empty(), "a peer downloaded single updates");
        let aggregate = r.aggregate.as_ref().expect("no aggregate");
        assert!(
            aggregate.len() <= 3 * largest,
            "the aggregate is {} bytes, one update {largest}",
            aggregate.len()
        );
        assert_eq!(r.downloaded_bytes(), aggregate.len() as u64);
        assert_eq!(
            r.aggregate, results[0].aggregate,
            "peers got different steps"
        );
    }
    assert_eq!(summary.download_bytes, results[0].downloaded_bytes());
    // The evaluator scores every update, and steps its replica with the same aggregate.
    assert_eq!(seen.aggregate, results[0].aggregate);
    let scored: Vec<_> = seen.entries.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(scored, updates);
    assert!(seen.entries.iter().all(|e| !e.left_out));
    assert!(stepped(&again, &seen) == stepped(&again, &results[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_gather_limit_a_peer_downloads_only_the_updates_the_step_takes() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--download", "gather", "--gather", "2"];
    let run = small_run(dir.path(), &args);
    let again = small_run(&dir.path().join("again"), &args);
    let (results, seen, summary, updates) = one_round(run, dir.path()).await;
    let taken: Vec<_> = results[0].entries.iter().map(|e| e.peer).collect();
    assert_eq!(taken.len(), 2, "{taken:?}");
    for r in &results {
        assert!(r.aggregate.is_none());
        let peers: Vec<_> = r.entries.iter().map(|e| e.peer).collect();
        assert_eq!(peers, taken, "peers were given different steps");
    }
    assert_eq!(summary.download_bytes, results[0].downloaded_bytes());
    assert_eq!(summary.contributors.len(), 3, "every update was accepted");
    // The evaluator gets all three, the one left out marked, and steps as peers do.
    assert_eq!(seen.entries.len(), 3);
    let left_out: Vec<_> = (seen.entries.iter())
        .filter(|e| e.left_out)
        .map(|e| e.peer)
        .collect();
    assert_eq!(left_out.len(), 1);
    assert!(!taken.contains(&left_out[0]));
    let sent = &updates[left_out[0].index() as usize];
    assert!(results[0].entries.iter().all(|e| &e.bytes != sent));
    assert!(stepped(&again, &seen) == stepped(&again, &results[0]));
}
