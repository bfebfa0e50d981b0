//! The exchange in process: what it refuses and why, and that every algorithm keeps the
//! peers and the exchange bit-identical.

use std::time::Duration;

use candle_core::Device;

use super::client::{ClientError, ClientOptions, ExchangeClient};
use super::server::{Exchange, ExchangeOptions};
use super::tls::ClientTls;
use super::{Identity, PeerId, Reason, Refusal, Settings, Tokens};
use crate::model::{InnerOptimizer, Llama, load_checkpoint};
use crate::outer::{Outer, Round};
use crate::roles::metrics::PROMETHEUS_TEXT;
use crate::roles::train::{PeerOptions, train};
use crate::run::Run;
use crate::testing::{small_config, small_run};
use tonic::Status;

pub(super) const OPERATOR: &str = "operator-token-0000";

pub(super) fn token(peer: u32) -> String {
    format!("peer-token-{peer:08}")
}

pub(super) fn options(dir: &std::path::Path) -> ExchangeOptions {
    let mut tokens = Tokens::default();
    for p in 0..3 {
        tokens.insert(token(p), Identity::Peer(PeerId::new(p)));
    }
    tokens.insert(OPERATOR, Identity::Operator);
    ExchangeOptions {
        tokens,
        settings: Some(Settings {
            rounds: 3,
            min_peers: 2,
            round_deadline: 60.0,
            checkpoint_every: 100,
            // Below the deadline, so that later rounds show it adapting.
            round_deadline_floor: 30.0,
            round_quorum: 0.75,
        }),
        liveness: Duration::from_secs(60),
        max_update_bytes: None,
        keep_rounds: 2,
        state_dir: None,
        storage: None,
        checkpoint_dir: Some(dir.join("exchange")),
        eval_rows: 4,
        run_name: "test".into(),
        tls: None,
    }
}

/// Serves an exchange for `run` on a loopback port; returns its URL.
pub(super) async fn serve(run: Run, opts: ExchangeOptions) -> String {
    serve_exchange(Exchange::new(run, opts).unwrap()).await
}

/// Serves `exchange` on a free loopback port; its URL.
pub(super) async fn serve_exchange(exchange: Exchange) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(exchange.serve(listener, std::future::pending()));
    url
}

pub(super) fn client(url: &str, token: &str, fingerprint: &str) -> ExchangeClient {
    ExchangeClient::new(ClientOptions {
        url: url.into(),
        token: token.into(),
        fingerprint: fingerprint.into(),
        bandwidth_mbps: None,
        retry_for: Duration::from_secs(5),
        tls: None,
    })
    .unwrap()
}

/// A real round-0 update of peer `p`.
pub(super) fn update(run: &Run, p: u32) -> Vec<u8> {
    let model = Llama::new(run.model.clone(), run.config.seed, &Device::Cpu).unwrap();
    let mut outer = Outer::new(&run.config, &model).unwrap();
    let mut inner =
        InnerOptimizer::new(&model, run.config.adamw(), run.config.schedule(Round(3))).unwrap();
    outer
        .local_round(&model, &mut inner, &run.batches(p, 0), 2)
        .unwrap()
        .bytes
}

/// A plain HTTP/1.1 GET, as a Prometheus scraper makes it.
async fn http_get(url: &str, path: &str) -> String {
    http_request(url, path, None).await
}

/// A raw HTTP/1.1 `GET` (with a bearer token if given): the whole response as text.
async fn http_request(url: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

pub(super) fn reason(e: ClientError) -> (Reason, String) {
    let r = e.refusal().unwrap_or_else(|| panic!("not a refusal: {e}"));
    (r.reason, r.message.clone())
}

/// The refusal table at the top of `exchange.proto`: reason → code name.
fn documented_codes() -> Vec<(String, String)> {
    let proto = include_str!("../../proto/exchange.proto");
    let table = proto
        .lines()
        .skip_while(|l| !l.contains("reason           code"))
        .skip(1)
        .take_while(|l| l.trim() != "//");
    table
        .filter_map(|l| {
            let mut words = l.trim_start_matches("//").split_whitespace();
            let (reason, code) = (words.next()?, words.next()?);
            code.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (reason.to_owned(), code.to_owned()))
        })
        .collect()
}

#[test]
fn every_refusal_has_the_status_code_the_proto_documents() {
    let documented = documented_codes();
    let camel = |code: &str| -> String {
        code.split('_')
            .map(|w| w[..1].to_owned() + &w[1..].to_lowercase())
            .collect()
    };
    let ours: std::collections::BTreeMap<String, String> = Reason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), format!("{:?}", r.code())))
        .collect();
    let theirs: std::collections::BTreeMap<String, String> = documented
        .iter()
        .map(|(r, c)| (r.clone(), camel(c)))
        .collect();
    assert_eq!(
        ours, theirs,
        "the proto's refusal table and `Reason::code` disagree"
    );
    // And a status is a refusal only under its reason's own code.
    let refusal = Refusal::new(Reason::RoundClosed, "too late");
    assert_eq!(Refusal::from_status(&refusal.clone().into()), Some(refusal));
    let mut wrong = Status::new(tonic::Code::InvalidArgument, "too late");
    wrong
        .metadata_mut()
        .insert("x-starling-reason", "round-closed".parse().unwrap());
    assert_eq!(Refusal::from_status(&wrong), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_refused_with_a_reason_and_hurt_nobody() {
    let dir = tempfile::tempdir().unwrap();
    // Every update reaches every peer, so what each peer received can be compared.
    let run = small_run(dir.path(), &["--download", "all"]);
    let fp = run.fingerprint.clone();
    let (good0, good1) = (update(&run, 0), update(&run, 1));
    let foreign = {
        let mut config = small_config();
        config.num_hidden_layers = 1;
        let model = Llama::new(config, 0, &Device::Cpu).unwrap();
        let mut outer = Outer::new(&run.config, &model).unwrap();
        let mut inner =
            InnerOptimizer::new(&model, run.config.adamw(), run.config.schedule(Round(3))).unwrap();
        outer
            .local_round(&model, &mut inner, &run.batches(0, 0), 2)
            .unwrap()
            .bytes
    };
    let other_codec = update(
        &small_run(
            &dir.path().join("codec"),
            &["--chunk", "2048", "--k", "32", "--bits", "4"],
        ),
        0,
    );
    let mut opts = options(dir.path());
    opts.max_update_bytes = Some(3 * good0.len() as u64);
    let other = small_run(&dir.path().join("other"), &["--lr", "0.1"]);
    let exchange = Exchange::new(run, opts).unwrap();
    let url = serve_exchange(exchange.clone()).await;
    let p0 = client(&url, &token(0), &fp);
    let p1 = client(&url, &token(1), &fp);
    let operator = client(&url, OPERATOR, &fp);

    let (r, m) = reason(
        client(&url, "not-a-token-at-all", &fp)
            .join()
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::Unauthenticated, "{m}");
    let (r, _) = reason(
        operator
            .put_update(Round(0), &good0, 1.0)
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::Forbidden);
    let (r, _) = reason(p0.run_state().await.unwrap_err());
    assert_eq!(r, Reason::Forbidden);
    let (r, m) = reason(
        client(&url, &token(0), &other.fingerprint)
            .join()
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::ConfigMismatch);
    assert!(m.contains(&other.fingerprint), "{m}");

    assert_eq!(
        p0.join().await.unwrap(),
        (PeerId::new(0), Round(0), Round(3))
    );
    let (r, m) = reason(p0.put_update(Round(0), b"garbage", 1.0).await.unwrap_err());
    assert_eq!(r, Reason::CorruptUpdate, "{m}");
    // Damaged in transit.
    let mut flipped = good0.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0xff;
    let (r, m) = reason(p0.put_update(Round(0), &flipped, 1.0).await.unwrap_err());
    assert_eq!(r, Reason::CorruptUpdate);
    eprintln!("flipped byte: {m}");
    // Well-formed, but made for another model.
    let (r, m) = reason(p0.put_update(Round(0), &foreign, 1.0).await.unwrap_err());
    assert_eq!(r, Reason::CorruptUpdate);
    eprintln!("foreign model: {m}");
    // Well-formed for this model, but with codec settings of the peer's own choosing: a
    // denser update than the run's, which every peer would download.
    let (r, m) = reason(
        p0.put_update(Round(0), &other_codec, 1.0)
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::ConfigMismatch);
    assert!(m.contains("chunk 2048 / k 32 / 4-bit"), "{m}");
    assert!(m.contains("this run uses chunk"), "{m}");
    let huge = vec![0u8; 4 * good0.len()];
    let (r, m) = reason(p0.put_update(Round(0), &huge, 1.0).await.unwrap_err());
    assert_eq!(r, Reason::TooLarge);
    assert!(m.contains("exceeds the limit"), "{m}");
    let (r, _) = reason(p0.put_update(Round(2), &good0, 1.0).await.unwrap_err());
    assert_eq!(r, Reason::Resync);

    // None of that touched the round: two good updates close it at quorum.
    p1.join().await.unwrap();
    let (a, b) = tokio::join!(
        p0.exchange_round(Round(0), Some((&good0, 2.0))),
        p1.exchange_round(Round(0), Some((&good1, 3.0)))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let peers: Vec<_> = a.entries.iter().map(|e| e.peer).collect();
    assert_eq!(peers, [PeerId::new(0), PeerId::new(1)]);
    assert_eq!(a.entries[0].bytes, good0);
    assert_eq!(b.entries[1].bytes, good1);
    assert_eq!(a.accepted_bytes, Some(good0.len() as u64));

    // Too late for round 0 (p2 never sent), and a retry of an accepted update is fine.
    let p2 = client(&url, &token(2), &fp);
    let (r, m) = reason(p2.put_update(Round(0), &good1, 1.0).await.unwrap_err());
    assert_eq!(r, Reason::RoundClosed);
    assert!(m.contains("too late"), "{m}");
    assert_eq!(
        p0.put_update(Round(0), &good0, 2.0).await.unwrap(),
        good0.len() as u64
    );
    // ...but not a retry with other bytes.
    let (r, m) = reason(p0.put_update(Round(0), &good1, 2.0).await.unwrap_err());
    assert_eq!(r, Reason::BadRequest);
    assert!(m.contains("already submitted a different update"), "{m}");

    let state = operator.run_state().await.unwrap();
    assert_eq!(state.open_round, 1);
    let p0_state = &state.peers[0];
    assert_eq!(
        (p0_state.updates_accepted, p0_state.updates_rejected),
        (1, 7)
    );
    assert!(
        p0_state
            .last_rejection
            .contains("already submitted a different update"),
        "{p0_state:?}"
    );
    assert_eq!(state.peers[1].updates_rejected, 0);
    assert_eq!(state.recent[0].contributors, ["p0", "p1"]);
    // Both peers the exchange knew had sent, with `min_peers` = 2: closed at quorum, not
    // after waiting out its minute.
    assert!(!state.recent[0].closed_at_deadline, "{:?}", state.recent[0]);
    assert_eq!(state.recent[0].closed_by, "all-in");
    // With no round before it, the round had the full deadline.
    assert_eq!(state.recent[0].deadline_seconds, 60.0);
    assert!(state.recent[0].waited_seconds < 60.0);
    assert!(state.recent[0].validation_loss.is_finite());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}", listener.local_addr().unwrap());
    let text = move || exchange.metrics_text();
    tokio::spawn(crate::roles::metrics::serve(
        listener,
        PROMETHEUS_TEXT,
        text,
    ));
    let metrics = http_get(&metrics_url, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for line in [
        "starling_exchange_open_round 1",
        "starling_exchange_updates_rejected_total{peer=\"p0\"} 7",
        "starling_exchange_updates_accepted_total{peer=\"p1\"} 1",
        "# TYPE starling_exchange_bytes_received_total counter",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }

    let (r, _) = reason(
        operator
            .set_weights([(PeerId::new(1), f32::NAN)])
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::BadRequest);
}

/// Two peers (threads) and the exchange run `algorithm` for three rounds; everyone ends
/// with the same bytes. Returns the directory, with `exchange/round-000003/`.
fn federate(algorithm: &str) -> tempfile::TempDir {
    federate_with(algorithm, |_| vec![])
}

fn federate_with(
    algorithm: &str,
    setup: impl Fn(&std::path::Path) -> Vec<String>,
) -> tempfile::TempDir {
    federate_lengthened(algorithm, setup, None)
}

/// [`federate_with`], and with `lengthen_to` the operator makes the run that long once
/// round 0 has closed.
fn federate_lengthened(
    algorithm: &str,
    setup: impl Fn(&std::path::Path) -> Vec<String>,
    lengthen_to: Option<u32>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--algorithm".to_owned(), algorithm.to_owned()];
    args.extend(["--max-peers".to_owned(), "2".to_owned()]);
    args.extend(setup(dir.path()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = small_run(dir.path(), &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts = options(dir.path());
    if lengthen_to.is_some() {
        // Rounds wait out a short deadline (a quorum of three cannot be met), so the
        // run is still at round 1 when the operator lengthens it.
        let settings = opts.settings.as_mut().unwrap();
        (settings.min_peers, settings.round_deadline) = (3, 3.0);
    }
    let url = rt.block_on(serve(run, opts));
    let peers: Vec<_> = (0..2)
        .map(|p| {
            let (url, dir) = (url.clone(), dir.path().to_owned());
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // Its own model file and shards: peers start at once.
                let run = small_run(&dir.join(format!("p{p}-run")), &args);
                let opts = PeerOptions {
                    exchange: url,
                    token: token(p),
                    bandwidth_mbps: None,
                    retry_for: Duration::from_secs(10),
                    heartbeat: Duration::from_millis(200),
                    tls: None,
                    checkpoint_dir: Some(dir.join(format!("peer{p}"))),
                    adversary: None,
                    metrics_listen: None,
                };
                train(&run, opts).unwrap()
            })
        })
        .collect();
    if let Some(rounds) = lengthen_to {
        rt.block_on(async {
            let operator = client(&url, OPERATOR, "");
            while operator.run_state().await.unwrap().open_round < 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let state = operator.run_state().await.unwrap();
            assert_eq!(
                state.open_round, 1,
                "the run went on before it was lengthened"
            );
            let mut settings = options(dir.path()).settings.unwrap();
            settings.rounds = rounds;
            assert_eq!(operator.configure(settings).await.unwrap(), settings);
        });
    }
    let rounds = lengthen_to.unwrap_or(3);
    for p in peers {
        let report = p.join().unwrap();
        assert_eq!(report.updates_accepted, rounds, "{report:?}");
    }
    if lengthen_to.is_none() {
        // Every round was all in; after the first, the deadline followed the rounds
        // before (seconds at most, so the floor) instead of the full minute.
        let state = rt
            .block_on(async { client(&url, OPERATOR, "").run_state().await })
            .unwrap();
        let paced: Vec<(&str, f64)> = (state.recent.iter())
            .map(|r| (r.closed_by.as_str(), r.deadline_seconds))
            .collect();
        assert_eq!(
            paced,
            [("all-in", 60.0), ("all-in", 30.0), ("all-in", 30.0)],
            "{algorithm}"
        );
    }
    let last = format!("exchange/round-{rounds:06}");
    let bytes = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    let exchange = bytes(&last);
    assert!(bytes("peer0") == exchange, "{algorithm}: peer 0 differs");
    assert!(bytes("peer1") == exchange, "{algorithm}: peer 1 differs");
    let (_, meta) = load_checkpoint(&dir.path().join(&last), &Device::Cpu).unwrap();
    assert_eq!(meta["round"], rounds);
    assert_eq!(meta["contributors"], serde_json::json!(["p0", "p1"]));
    dir
}

#[test]
fn a_run_starts_from_a_checkpoint_and_keeps_its_hugging_face_tokenizer() {
    let words = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","unk_token":"[UNK]",
        "vocab":{"[UNK]":0,"the":1,"and":2,"I":3,"to":4,"of":5,",":6,".":7}}}"#;
    let dir = federate_with("sparseloco", |dir| {
        let init = Llama::new(small_config(), 42, &Device::Cpu).unwrap();
        crate::model::save_checkpoint(
            &dir.join("init"),
            &init,
            &serde_json::json!({}),
            &crate::data::Tokenizer::Bytes,
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), words).unwrap();
        ["--init-from", "--tokenizer"]
            .into_iter()
            .zip(["init", "tokenizer.json"])
            .flat_map(|(flag, file)| [flag.to_owned(), dir.join(file).display().to_string()])
            .collect()
    });
    let out = dir.path().join("exchange/round-000003");
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        words
    );
    // The run started from the checkpoint, not from its own seed: three small rounds
    // stay far closer to the checkpoint's weights than to the seed's.
    let (trained, _) = load_checkpoint(&out, &Device::Cpu).unwrap();
    let (init, _) = load_checkpoint(&dir.path().join("init"), &Device::Cpu).unwrap();
    let seeded = Llama::new(small_config(), 0, &Device::Cpu).unwrap();
    let distance = |a: &Llama, b: &Llama| -> f32 {
        let (x, y) = (&a.params()[0].1, &b.params()[0].1);
        (x.as_tensor() - y.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let (near, far) = (distance(&trained, &init), distance(&trained, &seeded));
    assert!(near < 0.5 * far, "{near} vs {far}");
}

#[test]
fn sparseloco_keeps_peers_and_exchange_bit_identical() {
    federate("sparseloco");
}

#[test]
fn median_norm_aggregation_keeps_peers_and_exchange_bit_identical() {
    let dir = federate_with("sparseloco", |_| {
        vec!["--aggregation".to_owned(), "median-norm".to_owned()]
    });
    // The rule took part: the same run under the weighted mean ends elsewhere.
    let mean = federate("sparseloco");
    let weights = |d: &tempfile::TempDir| {
        std::fs::read(d.path().join("exchange/round-000003/model.safetensors")).unwrap()
    };
    assert!(
        weights(&dir) != weights(&mean),
        "median-norm made no difference"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_calling_is_not_waited_for_past_its_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &["--download", "all"]);
    let fp = run.fingerprint.clone();
    let good0 = update(&run, 0);
    let mut opts = options(dir.path());
    let settings = opts.settings.as_mut().unwrap();
    settings.min_peers = 1;
    // Far beyond the test: only p1 lapsing can close the round this soon.
    settings.round_deadline = 600.0;
    opts.liveness = Duration::from_secs(1);
    let url = serve(run, opts).await;
    let (p0, p1) = (client(&url, &token(0), &fp), client(&url, &token(1), &fp));
    let operator = client(&url, OPERATOR, &fp);
    p1.join().await.unwrap();
    let result = p0.exchange_round(Round(0), Some((&good0, 2.0)));
    let result = tokio::time::timeout(Duration::from_secs(120), result)
        .await
        .expect("the round waited for a peer that stopped calling")
        .unwrap();
    assert_eq!(result.entries.len(), 1);
    let summary = operator.run_state().await.unwrap().recent[0].clone();
    assert_eq!(summary.contributors, ["p0"]);
    assert!(!summary.closed_at_deadline, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_watching_a_run_hears_of_each_change_and_not_of_time_passing() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let fp = run.fingerprint.clone();
    let good0 = update(&run, 0);
    let mut opts = options(dir.path());
    opts.settings.as_mut().unwrap().min_peers = 1;
    opts.liveness = Duration::from_secs(1);
    let url = serve(run, opts).await;
    let (p0, p1) = (client(&url, &token(0), &fp), client(&url, &token(1), &fp));
    let operator = client(&url, OPERATOR, &fp);
    let (r, _) = reason(
        p0.watch_run_state()
            .await
            .err()
            .expect("a peer may not watch"),
    );
    assert_eq!(r, Reason::Forbidden);
    let mut watch = Box::pin(operator.watch_run_state().await.unwrap());
    let mut next = async |within: Duration| {
        let item = tokio::time::timeout(within, watch.next()).await.ok()?;
        Some(item.expect("the watch ended").expect("the watch failed"))
    };
    let minute = Duration::from_secs(60);
    let first = next(minute).await.expect("the state as it is");
    assert_eq!((first.open_round, first.peers.len()), (0, 0));

    p1.join().await.unwrap();
    let joined = next(minute).await.expect("p1's arrival");
    assert_eq!(joined.peers[0].peer, "p1", "{joined:?}");
    // p1 falls silent; p0 alone closes round 0 (the quorum is 1).
    p0.join().await.unwrap();
    p0.exchange_round(Round(0), Some((&good0, 2.0)))
        .await
        .unwrap();
    // Pushed when it happens, well before the keepalive would have carried it.
    let mut state = joined;
    while state.open_round == 0 {
        let before_keepalive = super::WATCH_KEEPALIVE - Duration::from_secs(5);
        state = next(before_keepalive)
            .await
            .expect("the closed round pushed at once");
    }
    while state.peers.iter().any(|p| p.alive) {
        state = next(minute).await.expect("p0 falling silent");
    }
    // Nothing changes now: time passing alone sends nothing until the keepalive, which
    // repeats the same state.
    assert!(
        next(Duration::from_secs(5)).await.is_none(),
        "an unchanged run was sent again"
    );
    let again = next(super::WATCH_KEEPALIVE * 2)
        .await
        .expect("the keepalive");
    assert!(!again.differs_from(&state), "{again:?}\n{state:?}");
    assert!(again.peers[0].last_seen_ms_ago > state.peers[0].last_seen_ms_ago);
}

#[test]
fn diloco_keeps_peers_and_exchange_bit_identical() {
    federate("diloco");
}

#[test]
fn ddp_keeps_peers_and_exchange_bit_identical() {
    federate("ddp");
}

/// DDP's replicas share the learning-rate schedule, which stretches with the run: every
/// replica must switch to it at the same round.
#[test]
fn a_run_made_longer_mid_way_trains_on_with_replicas_bit_identical() {
    federate_lengthened("ddp", |_| vec![], Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_awaiting_its_settings_admits_peers_once_configured_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let fp = run.fingerprint.clone();
    let mut opts = options(dir.path());
    let settings = opts.settings.take().unwrap();
    opts.state_dir = Some(dir.path().join("state"));
    let url = serve(run, opts.clone()).await;
    let p0 = client(&url, &token(0), &fp);
    let operator = client(&url, OPERATOR, &fp);
    let state = operator.run_state().await.unwrap();
    assert_eq!((state.settings, state.done), (None, false));
    // Unconfigured, the exchange is "not up yet" to a peer, which keeps retrying.
    let join = tokio::spawn(async move { p0.join().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !join.is_finished(),
        "a peer was admitted before the settings came"
    );
    let (r, m) = reason(
        operator
            .configure(Settings {
                rounds: 0,
                ..settings
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::BadRequest, "{m}");
    let (r, _) = reason(
        client(&url, &token(1), &fp)
            .configure(settings)
            .await
            .unwrap_err(),
    );
    assert_eq!(r, Reason::Forbidden);
    assert_eq!(operator.configure(settings).await.unwrap(), settings);
    let (_, open, rounds) = join.await.unwrap().unwrap();
    assert_eq!((open, rounds), (Round(0), Round(3)));

    // A restarted exchange keeps the operator's latest settings over its own.
    let longer = Settings {
        rounds: 7,
        ..settings
    };
    operator.configure(longer).await.unwrap();
    let run = small_run(&dir.path().join("again"), &[]);
    opts.settings = Some(settings);
    let again = client(&serve(run, opts).await, OPERATOR, &fp);
    let state = again.run_state().await.unwrap();
    assert_eq!(state.settings, Some(longer.into()));
    assert_eq!(state.rounds, 7);
}

#[test]
fn tokens_file_names_peers_and_the_operator_and_rejects_mistakes() {
    let t =
        Tokens::parse("# run tokens\np0 aaaaaaaaaaaaaaaa\noperator bbbbbbbbbbbbbbbb\n").unwrap();
    assert_eq!(
        t.identify("aaaaaaaaaaaaaaaa"),
        Some(Identity::Peer(PeerId::new(0)))
    );
    assert_eq!(t.identify("bbbbbbbbbbbbbbbb"), Some(Identity::Operator));
    assert_eq!(t.identify("cccccccccccccccc"), None);
    let short = Tokens::parse("p1 short").unwrap_err();
    assert!(short.contains("shorter than 16"), "{short}");
    let bad = Tokens::parse("peer1 aaaaaaaaaaaaaaaa").unwrap_err();
    assert!(bad.contains("invalid peer id"), "{bad}");
    let reused = Tokens::parse("p0 aaaaaaaaaaaaaaaa\np1 aaaaaaaaaaaaaaaa").unwrap_err();
    assert!(reused.contains("line 2: token reused"), "{reused}");
}

#[test]
fn refusals_survive_the_trip_through_a_grpc_status() {
    for reason in Reason::ALL {
        let status = Status::from(Refusal::new(reason, "because"));
        assert_eq!(status.code(), reason.code());
        assert_eq!(
            Refusal::from_status(&status),
            Some(Refusal::new(reason, "because"))
        );
    }
    assert_eq!(Refusal::from_status(&Status::unavailable("down")), None);
}

#[test]
fn peer_ids_parse_strictly() {
    assert_eq!("p12".parse::<PeerId>().unwrap().index(), 12);
    for bad in ["12", "p", "p01", "q1", "p-1"] {
        assert!(bad.parse::<PeerId>().is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_reach_a_tls_exchange_only_through_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let fp = run.fingerprint.clone();
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let read = |f: &str| std::fs::read(tls.join(f)).unwrap();
    let model = Llama::new(small_config(), 3, &Device::Cpu).unwrap();
    let ckpt = dir.path().join("exchange/round-000003");
    let meta = serde_json::json!({"round": 3});
    crate::model::save_checkpoint(&ckpt, &model, &meta, &crate::data::Tokenizer::Bytes).unwrap();
    let mut opts = options(dir.path());
    opts.tls = Some((read("server.pem"), read("server.key")));
    opts.tokens.insert(PUBLISHER, Identity::Publisher);
    let url = serve(run, opts).await;
    let https = url.replace("http://127.0.0.1", "https://localhost");
    let connect = |url: &str, ca: Option<Vec<u8>>, server_name: Option<&str>| {
        ExchangeClient::new(ClientOptions {
            url: url.into(),
            token: token(0),
            fingerprint: fp.clone(),
            bandwidth_mbps: None,
            // Long enough that a refused certificate shows it is not retried.
            retry_for: Duration::from_secs(60),
            tls: ca.map(|ca| ClientTls {
                ca,
                server_name: server_name.map(str::to_owned),
            }),
        })
        .unwrap()
    };
    let (peer, _, _) = connect(&https, Some(read("ca.pem")), None)
        .join()
        .await
        .unwrap();
    assert_eq!(peer, PeerId::new(0));
    // Dialled by address, verified by the name the certificate carries.
    let by_address = url.replace("http://", "https://");
    let (peer, _, _) = connect(&by_address, Some(read("ca.pem")), Some("localhost"))
        .join()
        .await
        .unwrap();
    assert_eq!(peer, PeerId::new(0));

    // Another CA, or a certificate for another name: refused at once, saying why.
    let start = std::time::Instant::now();
    let wrong_ca = connect(&https, Some(read("server.pem")), None).join().await;
    let e = wrong_ca.unwrap_err();
    assert!(matches!(e, ClientError::Untrusted { .. }), "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let wrong_name = connect(
        &by_address,
        Some(read("ca.pem")),
        Some("exchange.other.run"),
    );
    let e = wrong_name.join().await.unwrap_err();
    assert!(e.to_string().contains("NotValidForName"), "{e}");
    assert!(e.to_string().contains("STARLING_TLS_SERVER_NAME"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(30), "not retried");
    // In plain text nothing is served.
    assert!(connect(&url, None, None).join().await.is_err());

    // The publisher downloads a checkpoint the same way (HTTP over the exchange's TLS).
    let tls = ClientTls {
        ca: read("ca.pem"),
        server_name: Some("localhost".into()),
    };
    let checkpoint = format!("{by_address}/checkpoints/round-000003");
    let source = crate::hub::ExchangeCheckpoint::new(&checkpoint, PUBLISHER.into(), Some(&tls));
    let copy = dir.path().join("copy");
    source.unwrap().download(&copy).await.unwrap();
    assert!(copy.join("model.safetensors").exists());
}

const PUBLISHER: &str = "publisher-token-000";

/// A `GET` with a bearer token: the status line's code.
async fn http_status(url: &str, path: &str, token: &str) -> u16 {
    http_request(url, path, Some(token)).await[9..12]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_downloads_checkpoints_and_reports_publications_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let run = small_run(dir.path(), &[]);
    let fp = run.fingerprint.clone();
    let model = Llama::new(small_config(), 3, &Device::Cpu).unwrap();
    let ckpt = dir.path().join("exchange/round-000003");
    let meta = serde_json::json!({"round": 3});
    crate::model::save_checkpoint(&ckpt, &model, &meta, &crate::data::Tokenizer::Bytes).unwrap();
    let mut opts = options(dir.path());
    opts.tokens.insert(PUBLISHER, Identity::Publisher);
    let url = serve(run, opts).await;

    // Only the publisher (and the operator) read checkpoints, and only checkpoints.
    let list = "/checkpoints/round-000003";
    assert_eq!(http_status(&url, list, &token(0)).await, 403);
    assert_eq!(http_status(&url, list, "not-a-token-at-all").await, 401);
    assert_eq!(http_status(&url, list, PUBLISHER).await, 200);
    assert_eq!(
        http_status(&url, "/checkpoints/round-000004", PUBLISHER).await,
        404
    );
    assert_eq!(
        http_status(&url, "/checkpoints/..%2Fstate", PUBLISHER).await,
        404
    );
    assert_eq!(
        http_status(&url, &format!("{list}/..%2F..%2Fx"), PUBLISHER).await,
        404
    );
    // ...and the publisher's token opens nothing else.
    let (r, _) = reason(client(&url, PUBLISHER, &fp).join().await.unwrap_err());
    assert_eq!(r, Reason::Forbidden);
    assert_eq!(
        reason(client(&url, PUBLISHER, &fp).run_state().await.unwrap_err()).0,
        Reason::Forbidden
    );

    let source =
        crate::hub::ExchangeCheckpoint::new(&format!("{url}{list}"), PUBLISHER.into(), None)
            .unwrap();
    let copy = dir.path().join("copy");
    source.download(&copy).await.unwrap();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            std::fs::read(copy.join(&name)).unwrap() == std::fs::read(ckpt.join(&name)).unwrap(),
            "{name:?}"
        );
    }

    let published = crate::hub::Published {
        repo: "org/tiny".into(),
        revision: "round-3".into(),
        commit: "a".repeat(40),
        url: "https://huggingface.co/org/tiny/tree/round-3".into(),
        already: false,
    };
    source.report(Ok(&published)).await.unwrap();
    let state = client(&url, OPERATOR, &fp).run_state().await.unwrap();
    assert_eq!(state.publications.len(), 1);
    let p = &state.publications[0];
    assert_eq!(
        (p.round, p.repo.as_str(), p.commit.as_str()),
        (3, "org/tiny", published.commit.as_str())
    );
    assert!(p.error.is_empty() && p.at_ms > 0);
}
