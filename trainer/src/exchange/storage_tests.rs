//! The exchange with its payloads and state on a real S3-compatible server (moto, on
//! loopback): peers put and get payloads there on signed URLs, and storage's faults cost
//! time, never an update.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::client::RoundResult;
use super::server::Exchange;
use super::storage::s3_server::{Fault, S3Server};
use super::storage::{Credentials, StorageSource};
use super::tests::{OPERATOR, client, options, serve, token, update};
use super::{Identity, proto};
use crate::outer::Round;
use crate::run::Run;
use crate::testing::small_run;

const EVALUATOR: &str = "evaluator-token-0000";

/// A bucket on a fresh S3 server, a run, and three peers' round-0 updates of it.
struct Setup {
    server: S3Server,
    url: String,
    dir: tempfile::TempDir,
    run: Run,
    updates: Vec<Vec<u8>>,
}

impl Setup {
    /// `None` where no S3 server is installed (outside CI).
    fn new() -> Option<Self> {
        let server = S3Server::start()?;
        server.create_bucket("run");
        let dir = tempfile::tempdir().unwrap();
        let run = small_run(dir.path(), &[]);
        let updates = (0..3).map(|p| update(&run, p)).collect();
        let url = "s3://run/exchange".to_string();
        Some(Self {
            server,
            url,
            dir,
            run,
            updates,
        })
    }

    /// The bucket, signed in with `credentials`.
    fn source_with(&self, credentials: Credentials) -> StorageSource {
        StorageSource {
            url: self.url.clone(),
            endpoint: Some(self.server.endpoint()),
            credentials,
        }
    }

    /// The bucket, signed in with the server's key.
    fn source(&self) -> StorageSource {
        self.source_with(self.server.credentials())
    }

    /// An exchange of the run keeping its payloads and state in `storage`, three peers
    /// and an evaluator; its URL.
    async fn exchange(&self, storage: StorageSource) -> String {
        let served = small_run(&self.dir.path().join("served"), &[]);
        let mut opts = options(self.dir.path());
        opts.settings.as_mut().unwrap().min_peers = 3;
        opts.tokens.insert(EVALUATOR, Identity::Evaluator(0));
        opts.storage = Some(storage);
        serve(served, opts).await
    }
}

/// Every peer sends its update for `round` and downloads the round's step.
async fn round(url: &str, run: &Run, updates: &[Vec<u8>], round: Round) -> Vec<RoundResult> {
    let peers: Vec<_> = (0..3)
        .map(|p| client(url, &token(p), &run.fingerprint))
        .collect();
    let rounds = (peers.iter().zip(updates)).map(|(p, u)| p.exchange_round(round, Some((u, 1.0))));
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(rounds));
    let results = results.await.expect("the round did not close in 2 minutes");
    results.into_iter().map(Result::unwrap).collect()
}

async fn run_state(url: &str) -> proto::RunState {
    client(url, OPERATOR, "").run_state().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_bucket_payloads_move_through_storage_and_the_exchange_sends_none() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (run, updates) = (&setup.run, setup.updates.as_slice());
    let store = setup.source().open().unwrap();
    let exchange = setup.exchange(setup.source()).await;
    let results = round(&exchange, run, updates, Round(0)).await;
    let aggregate = results[0].aggregate.clone().expect("no aggregate");
    assert!(
        results
            .iter()
            .all(|r| r.aggregate.as_ref() == Some(&aggregate))
    );
    // The evaluator gets every update, from storage, byte for byte.
    let evaluator = client(&exchange, EVALUATOR, "");
    let seen = evaluator.fetch_round(Round(0)).await.unwrap();
    let scored: Vec<_> = seen.entries.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(scored, updates);
    let state = run_state(&exchange).await;
    assert_eq!(state.recent[0].contributors, ["p0", "p1", "p2"]);
    assert_eq!(
        state.bytes_sent, 0,
        "the exchange sent payload bytes itself"
    );
    // In the bucket: the updates, the aggregate, and the state a new exchange resumes.
    for (p, u) in updates.iter().enumerate() {
        let key = format!("rounds/000000/p{p}");
        assert_eq!(store.get(&key).await.unwrap().unwrap(), u.as_slice());
    }
    let stored = store.get("rounds/000000/aggregate").await.unwrap().unwrap();
    assert_eq!(stored, aggregate.as_slice());
    assert!(store.get("state.safetensors").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_started_on_a_fresh_node_resumes_from_the_state_in_storage() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (run, updates) = (&setup.run, setup.updates.as_slice());
    let store = setup.source().open().unwrap();
    let first = setup.exchange(setup.source()).await;
    for r in 0..3 {
        round(&first, run, updates, Round(r)).await;
    }
    let (open, state) = client(&first, &token(0), &run.fingerprint)
        .fetch_state()
        .await
        .unwrap();
    assert_eq!(open, Round(3));
    // Another exchange, nothing on its disk, the same bucket: where the first one was.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut opts = options(elsewhere.path());
    opts.storage = Some(setup.source());
    let again = Exchange::new(small_run(elsewhere.path(), &[]), opts).unwrap();
    let resumed = super::tests::serve_exchange(again).await;
    let (open_again, state_again) = client(&resumed, &token(0), &run.fingerprint)
        .fetch_state()
        .await
        .unwrap();
    assert_eq!(open_again, Round(3));
    assert!(state_again == state, "the resumed state differs");
    // What the first one kept of rounds 1 and 2 the second one deletes: it keeps none.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store
        .get("rounds/000002/aggregate")
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "round 2's payloads were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Rounds beyond the two kept are deleted from the bucket.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.get("rounds/000000/p0").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "round 0's payloads were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_changed_after_acceptance_never_reaches_a_fetcher() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (run, updates) = (&setup.run, setup.updates.as_slice());
    let store = setup.source().open().unwrap();
    let exchange = setup.exchange(setup.source()).await;
    round(&exchange, run, updates, Round(0)).await;
    let evaluator = client(&exchange, EVALUATOR, "");
    let mut forged = updates[1].clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x55;
    // p1 rewrites its object with its still valid upload URL: fetchers never read that
    // one, but the copy the exchange made when it accepted it.
    let mine = Bytes::from(forged.clone());
    store.put("rounds/000000/p1", mine).await.unwrap();
    let seen = evaluator.fetch_round(Round(0)).await.unwrap();
    let scored: Vec<_> = seen.entries.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(scored, updates);
    assert_eq!(run_state(&exchange).await.bytes_sent, 0);
    // The accepted copy itself changed (someone with the bucket's key): the evaluator
    // refuses it and gets the round through the exchange instead.
    let accepted = Bytes::from(forged);
    store
        .put("rounds/000000/accepted/p1", accepted)
        .await
        .unwrap();
    let seen = evaluator.fetch_round(Round(0)).await.unwrap();
    let scored: Vec<_> = seen.entries.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(scored, updates, "the evaluator scored a changed update");
    let sent = run_state(&exchange).await.bytes_sent;
    let expected: usize =
        updates.iter().map(Vec::len).sum::<usize>() + seen.aggregate.as_ref().map_or(0, Vec::len);
    assert_eq!(sent, expected as u64);
}

/// Three peers' round 0 while storage fails the next `failures` connections with
/// `fault`: every update counts once, and every peer takes the same step.
async fn round_through_faults(fault: Fault, failures: usize) {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (run, updates) = (&setup.run, setup.updates.as_slice());
    let exchange = setup.exchange(setup.source()).await;
    // Everything goes through the faults: the exchange's reads and writes and the peers'
    // transfers.
    setup.server.fail_next(failures, fault);
    let results = round(&exchange, run, updates, Round(0)).await;
    assert_eq!(
        setup.server.failures_left(),
        0,
        "fewer connections than faults"
    );
    assert!(results.iter().all(|r| r.accepted_bytes.is_some()));
    assert!(results.iter().all(|r| r.aggregate == results[0].aggregate));
    let state = run_state(&exchange).await;
    // Each update counted once, however often it was sent.
    assert_eq!(state.recent[0].contributors, ["p0", "p1", "p2"]);
    let sent: usize = updates.iter().map(Vec::len).sum();
    assert_eq!(state.recent[0].bytes, sent as u64);
    assert!(state.peers.iter().all(|p| p.updates_accepted == 1));
    assert_eq!(state.bytes_sent, 0, "a payload went through the exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_answering_500_for_a_while_delays_the_round_and_loses_nothing() {
    round_through_faults(Fault::Error500, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_not_answering_for_a_while_delays_the_round_and_loses_nothing() {
    round_through_faults(Fault::Stall(Duration::from_secs(2)), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_whose_key_is_refused_says_why_admits_no_peer_and_resumes_once_it_is_fixed() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (run, updates) = (&setup.run, setup.updates.as_slice());
    // The credentials as a mounted Secret would hold them, with a key S3 does not know.
    let secret = setup.dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("AWS_ACCESS_KEY_ID"), "a-revoked-key").unwrap();
    std::fs::write(secret.join("AWS_SECRET_ACCESS_KEY"), "whatever").unwrap();
    let storage = setup.source_with(Credentials::Dir(secret.clone()));
    let exchange = setup.exchange(storage).await;
    let state = run_state(&exchange).await;
    assert!(
        state.storage_error.contains("InvalidAccessKeyId"),
        "{state:?}"
    );
    assert_eq!(state.storage, setup.url);
    let refused = client(&exchange, &token(0), &run.fingerprint).join().await;
    let refused = refused.expect_err("a peer was admitted").to_string();
    assert!(refused.contains("waiting for its storage"), "{refused}");
    // An evaluator's measurements wait too: the ledger they go to is in the bucket.
    let evaluator = client(&exchange, EVALUATOR, &run.fingerprint);
    let refused = (evaluator.put_measurements(Round(0), "{}").await)
        .expect_err("measurements were taken")
        .to_string();
    assert!(refused.contains("waiting for its storage"), "{refused}");
    // The Secret fixed: the exchange picks the key up on its next try and goes on.
    setup.server.write_credentials(&secret);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_state(&exchange).await.storage_error.is_empty() {
        assert!(Instant::now() < deadline, "the exchange never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let results = round(&exchange, run, updates, Round(0)).await;
    assert!(results.iter().all(|r| r.accepted_bytes.is_some()));
}
