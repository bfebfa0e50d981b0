//! The exchange with its payloads and state on a real S3-compatible server (moto, on
//! loopback): peers put and get payloads there on signed URLs, and storage's faults cost
//! time, never an update.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::client::RoundResult;
use super::server::Exchange;
use super::storage::Storage;
use super::storage::s3_server::S3Server;
use super::tests::{OPERATOR, client, options, serve, token, update};
use super::{Identity, proto};
use crate::outer::Round;
use crate::run::Run;
use crate::testing::small_run;

const EVALUATOR: &str = "evaluator-token-0000";

/// A fresh bucket on its own S3 server; `None` where none is installed (outside CI).
fn bucket() -> Option<(S3Server, String)> {
    let server = S3Server::start()?;
    server.create_bucket("run");
    Some((server, "s3://run/exchange".to_string()))
}

fn storage(server: &S3Server, endpoint: &str, url: &str) -> Storage {
    Storage::open(url, Some(endpoint), Some(&server.credentials())).unwrap()
}

/// An exchange of `run` keeping its payloads and state in `store`, three peers and an
/// evaluator; its URL.
async fn exchange(run: Run, dir: &std::path::Path, store: Storage) -> String {
    let mut opts = options(dir);
    opts.settings.as_mut().unwrap().min_peers = 3;
    opts.tokens.insert(EVALUATOR, Identity::Evaluator(0));
    opts.storage = Some(store);
    serve(run, opts).await
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
    let Some((server, url)) = bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let updates: Vec<Vec<u8>> = (0..3).map(|p| update(&run, p)).collect();
    let store = storage(&server, &server.endpoint(), &url);
    let exchange = exchange(
        small_run(&dir.path().join("served"), &[]),
        dir.path(),
        store.clone(),
    )
    .await;
    let results = round(&exchange, &run, &updates, Round(0)).await;
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
    let Some((server, url)) = bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let updates: Vec<Vec<u8>> = (0..3).map(|p| update(&run, p)).collect();
    let store = storage(&server, &server.endpoint(), &url);
    let first = exchange(
        small_run(&dir.path().join("served"), &[]),
        dir.path(),
        store.clone(),
    )
    .await;
    for r in 0..3 {
        round(&first, &run, &updates, Round(r)).await;
    }
    let (open, state) = client(&first, &token(0), &run.fingerprint)
        .fetch_state()
        .await
        .unwrap();
    assert_eq!(open, Round(3));
    // Another exchange, nothing on its disk, the same bucket: where the first one was.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut opts = options(elsewhere.path());
    opts.storage = Some(store.clone());
    let again = Exchange::new(small_run(elsewhere.path(), &[]), opts).unwrap();
    let resumed = super::tests::serve_exchange(again).await;
    let (open_again, state_again) = client(&resumed, &token(0), &run.fingerprint)
        .fetch_state()
        .await
        .unwrap();
    assert_eq!(open_again, Round(3));
    assert!(state_again == state, "the resumed state differs");
    // Rounds beyond the two kept are deleted from the bucket.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.get("rounds/000000/p0").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "round 0's payloads were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.get("rounds/000002/p0").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_changed_in_storage_after_acceptance_is_refused_and_fetched_through_the_exchange()
{
    let Some((server, url)) = bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let updates: Vec<Vec<u8>> = (0..3).map(|p| update(&run, p)).collect();
    let store = storage(&server, &server.endpoint(), &url);
    let exchange = exchange(
        small_run(&dir.path().join("served"), &[]),
        dir.path(),
        store.clone(),
    )
    .await;
    round(&exchange, &run, &updates, Round(0)).await;
    // p1 rewrites its object with its still valid upload URL, after the round closed.
    let mut forged = updates[1].clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x55;
    store
        .put("rounds/000000/p1", Bytes::from(forged))
        .await
        .unwrap();
    let evaluator = client(&exchange, EVALUATOR, "");
    let seen = evaluator.fetch_round(Round(0)).await.unwrap();
    let scored: Vec<_> = seen.entries.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(scored, updates, "the evaluator scored a changed update");
    // It came through the exchange instead: every update and the aggregate.
    let sent = run_state(&exchange).await.bytes_sent;
    let expected: usize =
        updates.iter().map(Vec::len).sum::<usize>() + seen.aggregate.as_ref().map_or(0, Vec::len);
    assert_eq!(sent, expected as u64);
}

/// A front for the HTTP server `upstream` that passes connections through, except that
/// while its counter (returned) is above zero each new connection takes one off it and
/// is answered 500 and closed.
async fn flaky_front(upstream: String) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("http://{}", listener.local_addr().unwrap());
    let failing = Arc::new(AtomicUsize::new(0));
    let count = failing.clone();
    let upstream = upstream.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let fail = count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if fail.is_ok() {
                let mut head = [0u8; 1024];
                let _ = conn.read(&mut head).await;
                let reply = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\
                             Connection: close\r\n\r\n";
                let _ = conn.write_all(reply.as_bytes()).await;
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    (front, failing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_answering_500_for_a_while_delays_the_round_and_loses_nothing() {
    let Some((server, url)) = bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let updates: Vec<Vec<u8>> = (0..3).map(|p| update(&run, p)).collect();
    // Everything, the exchange's reads and writes and the peers' transfers, goes through
    // a front that fails the next 12 connections once the exchange is up.
    let (front, failing) = flaky_front(server.endpoint()).await;
    let store = storage(&server, &front, &url);
    let exchange = exchange(
        small_run(&dir.path().join("served"), &[]),
        dir.path(),
        store,
    )
    .await;
    failing.store(12, Ordering::SeqCst);
    let results = round(&exchange, &run, &updates, Round(0)).await;
    assert_eq!(
        failing.load(Ordering::SeqCst),
        0,
        "fewer connections than failures"
    );
    assert!(results.iter().all(|r| r.accepted_bytes.is_some()));
    assert!(results.iter().all(|r| r.aggregate == results[0].aggregate));
    let state = run_state(&exchange).await;
    // Each update counted once, however often it was sent.
    assert_eq!(state.recent[0].contributors, ["p0", "p1", "p2"]);
    let sent: usize = updates.iter().map(Vec::len).sum();
    assert_eq!(state.recent[0].bytes, sent as u64);
    assert!(state.peers.iter().all(|p| p.updates_accepted == 1));
}
