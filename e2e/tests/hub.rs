//! Publishing to the Hugging Face Hub, against the Hub double: what lands is what the
//! official Python client downloads byte for byte, and every failure the Hub can throw
//! (5xx, 429 with Retry-After, a cut upload, a racing writer, a commit whose answer is
//! lost, a wrong token, a namespace out of reach) ends in exactly one commit or a clear
//! error.
#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use starling_e2e::hub::{Account, Endpoint, Fault, HubDouble, Role, RunningHub, Transfers};
use starling_trainer::data::Tokenizer;
use starling_trainer::hub::{self, Hub, HubError, PublishOptions, Quiet, Retry};
use starling_trainer::model::{Llama, Preset, save_checkpoint};

const WRITER: &str = "hf_alice_write";
const READER: &str = "hf_alice_read";
const TRAILER: &str = "Starling-Checkpoint: ";

async fn double(dir: &Path) -> RunningHub {
    let accounts = HashMap::from([
        (
            WRITER.to_owned(),
            Account {
                user: "alice".into(),
                role: Role::Write,
                orgs: vec!["starling-dev".into()],
            },
        ),
        (
            READER.to_owned(),
            Account {
                user: "alice".into(),
                role: Role::Read,
                orgs: vec!["starling-dev".into()],
            },
        ),
    ]);
    let hub = HubDouble::new(&dir.join("hub"), accounts).unwrap();
    // Small parts, so the tiny model's weights go up in several.
    hub.set_transfers(Transfers {
        multipart_from: 300_000,
        part_size: 128 * 1024,
    });
    hub.start(0).await.unwrap()
}

/// A client that retries quickly, as tests have no time to wait.
fn client(hub: &RunningHub, token: &str) -> Hub {
    Hub::new(&hub.url, Some(token.to_owned()))
        .unwrap()
        .with_retry(Retry {
            attempts: 6,
            first_wait: Duration::from_millis(20),
            max_wait: Duration::from_millis(100),
        })
}

/// A checkpoint of round 12 of a run, as the exchange writes one.
fn checkpoint(dir: &Path) -> PathBuf {
    let model = Llama::new(Preset::Tiny.config(256), 7, &candle_core::Device::Cpu).unwrap();
    let meta = serde_json::json!({"run": "shakespeare", "round": 12, "algorithm": "SparseLoCo",
        "validation_loss": 2.415, "train_loss": 2.3, "tokens": 1_966_080,
        "contributors": ["p0", "p1", "p2"], "tokenizer": "bytes",
        "codec": {"chunk": 4096, "k": 64, "bits": 2, "error_feedback": 0.95},
        "validation_curve": [{"round": 0, "loss": 5.6}, {"round": 6, "loss": 2.9},
                             {"round": 12, "loss": 2.415}]});
    let path = dir.join("round-000012");
    save_checkpoint(&path, &model, &meta, &Tokenizer::Bytes).unwrap();
    path
}

fn options(repo: &str) -> PublishOptions {
    let mut opts = PublishOptions::new(repo.parse().unwrap());
    opts.card.license = Some("apache-2.0".into());
    opts
}

async fn publish(hub: &Hub, dir: &Path, opts: &PublishOptions) -> Result<hub::Published, HubError> {
    hub::publish(hub, dir, opts, Arc::new(Quiet)).await
}

/// Commits of `repo`'s main branch that carry a checkpoint trailer.
fn checkpoint_commits(hub: &RunningHub, repo: &str) -> Vec<String> {
    let repo = hub.hub.repo(repo).unwrap();
    repo.history("main")
        .into_iter()
        .filter(|c| c.message.contains(TRAILER))
        .map(|c| c.id.clone())
        .collect()
}

/// The official client against the double, as the writer.
fn python(hub: &RunningHub, dir: &Path, args: &[&str]) -> Option<String> {
    common::hub_client(&hub.url, WRITER, &dir.join("hf-home"), args)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_checkpoint_downloads_byte_identical_with_the_official_client() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());
    let hub = client(&running, WRITER);
    let opts = options("starling-dev/shakespeare-tiny");

    let published = publish(&hub, &ckpt, &opts).await.unwrap();
    assert_eq!(published.revision, "round-12");
    assert!(!published.already);
    assert!(
        published
            .url
            .ends_with("/starling-dev/shakespeare-tiny/tree/round-12")
    );
    let repo = running.hub.repo("starling-dev/shakespeare-tiny").unwrap();
    assert_eq!(repo.tags["round-12"], published.commit);
    // The weights went up in parts, and the small files inline in the commit.
    let requests = running.hub.requests();
    let parts = requests
        .iter()
        .filter(|r| r.starts_with("PUT /upload/") && r.contains("/part/"))
        .count();
    assert!(parts >= 3, "{requests:#?}");
    let head = repo.resolve("main").unwrap();
    assert_eq!(head.title, "Round 12: validation loss 2.415");
    assert!(
        head.files["model.safetensors"].lfs,
        "weights go through LFS"
    );

    // Publishing the same checkpoint again finds the commit and makes none.
    let again = publish(&hub, &ckpt, &opts).await.unwrap();
    assert!(again.already);
    assert_eq!(again.commit, published.commit);
    assert_eq!(
        checkpoint_commits(&running, "starling-dev/shakespeare-tiny").len(),
        1
    );

    let Some(snapshot) = python(
        &running,
        dir.path(),
        &[
            "download",
            "starling-dev/shakespeare-tiny",
            "round-12",
            dir.path().join("cache").to_str().unwrap(),
        ],
    ) else {
        return;
    };
    let snapshot = PathBuf::from(snapshot);
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let name = entry.unwrap().file_name();
        let downloaded = std::fs::read(snapshot.join(&name)).unwrap();
        assert!(
            downloaded == std::fs::read(ckpt.join(&name)).unwrap(),
            "{name:?} differs"
        );
    }
    let card = std::fs::read_to_string(snapshot.join("README.md")).unwrap();
    let yaml = card
        .strip_prefix("---\n")
        .unwrap()
        .split_once("\n---")
        .unwrap()
        .0;
    let meta: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(meta["license"].as_str(), Some("apache-2.0"));
    assert_eq!(meta["library_name"].as_str(), Some("transformers"));
    let tags: Vec<&str> = meta["tags"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tags.contains(&"starling") && tags.contains(&"federated-training"),
        "{tags:?}"
    );
    let loss = &meta["model-index"][0]["results"][0]["metrics"][0]["value"];
    assert_eq!(loss.as_f64(), Some(2.415));
    assert!(yaml.contains("value: 2.4150"), "{yaml}");
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_above_the_shard_size_are_published_as_shards_with_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());
    let hub = client(&running, WRITER);
    let mut opts = options("starling-dev/sharded");
    opts.max_shard_bytes = 400_000;

    publish(&hub, &ckpt, &opts).await.unwrap();
    let repo = running.hub.repo("starling-dev/sharded").unwrap();
    let files = &repo.resolve("round-12").unwrap().files;
    let shards: Vec<&String> = files
        .keys()
        .filter(|p| p.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 2, "{shards:?}");
    assert!(!files.contains_key("model.safetensors"));
    let index = &files["model.safetensors.index.json"];
    let index: serde_json::Value =
        serde_json::from_slice(&running.hub.blob(&index.sha256).unwrap()).unwrap();
    let named: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(named.len(), shards.len());

    // The shards hold the checkpoint's tensors exactly, each once, with format=pt.
    let cache = dir.path().join("cache");
    let Some(snapshot) = python(
        &running,
        dir.path(),
        &[
            "download",
            "starling-dev/sharded",
            "round-12",
            cache.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    let original = python(&running, dir.path(), &["tensors", ckpt.to_str().unwrap()]).unwrap();
    let sharded = python(&running, dir.path(), &["tensors", &snapshot]).unwrap();
    assert_eq!(sharded, original);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_client_uploads_to_and_downloads_from_the_double() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    let big: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(folder.join("weights.bin"), &big).unwrap();
    std::fs::write(folder.join("sub/notes.txt"), "to be, or not to be").unwrap();
    std::fs::write(folder.join("README.md"), "---\nlicense: mit\n---\n# up\n").unwrap();
    let Some(commit) = python(
        &running,
        dir.path(),
        &["upload", "alice/up", folder.to_str().unwrap()],
    ) else {
        return;
    };
    let repo = running.hub.repo("alice/up").unwrap();
    assert_eq!(repo.branches["main"], commit);
    assert!(repo.resolve("main").unwrap().files["weights.bin"].lfs);
    let cache = dir.path().join("cache");
    let snapshot = python(
        &running,
        dir.path(),
        &["download", "alice/up", "main", cache.to_str().unwrap()],
    )
    .unwrap();
    for file in ["weights.bin", "sub/notes.txt", "README.md"] {
        let got = std::fs::read(Path::new(&snapshot).join(file)).unwrap();
        assert!(
            got == std::fs::read(folder.join(file)).unwrap(),
            "{file} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_everywhere_still_make_exactly_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());
    let hub = client(&running, WRITER);
    let double = &running.hub;
    let status = |status, retry_after| Fault::Status {
        status,
        retry_after,
    };
    double.inject(Endpoint::CreateRepo, status(503, None));
    double.inject(Endpoint::Preupload, status(500, None));
    double.inject(Endpoint::Preupload, status(429, Some(1)));
    double.inject(Endpoint::LfsBatch, status(502, None));
    double.inject(Endpoint::LfsUpload, Fault::Cut);
    double.inject(Endpoint::LfsUpload, status(503, None));
    double.inject(Endpoint::Commit, status(500, None));
    double.inject(Endpoint::Commit, Fault::LandThenFail);
    double.inject(Endpoint::Tag, status(429, None));

    let started = std::time::Instant::now();
    let published = publish(&hub, &ckpt, &options("starling-dev/flaky"))
        .await
        .unwrap();
    // The 429's Retry-After (1 s, plus one) was honoured.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(double.faults_left(), 0, "every fault was met");
    let commits = checkpoint_commits(&running, "starling-dev/flaky");
    assert_eq!(
        commits,
        vec![published.commit.clone()],
        "exactly one commit"
    );
    let repo = double.repo("starling-dev/flaky").unwrap();
    assert_eq!(repo.tags["round-12"], published.commit);
    let weights = &repo.resolve("main").unwrap().files["model.safetensors"];
    let stored = double.blob(&weights.sha256).unwrap();
    assert!(stored == std::fs::read(ckpt.join("model.safetensors")).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_racing_the_commit_makes_it_retry_on_the_new_head() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());
    let hub = client(&running, WRITER);
    running.hub.inject(Endpoint::Commit, Fault::Race);
    let published = publish(&hub, &ckpt, &options("starling-dev/raced"))
        .await
        .unwrap();
    let repo = running.hub.repo("starling-dev/raced").unwrap();
    let titles: Vec<&str> = repo
        .history("main")
        .iter()
        .map(|c| c.title.as_str())
        .collect();
    assert_eq!(
        titles,
        [
            "Round 12: validation loss 2.415",
            "Another writer's commit",
            "initial commit"
        ]
    );
    assert_eq!(repo.branches["main"], published.commit);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_carry_the_hubs_message_and_are_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());

    let err = publish(
        &client(&running, "hf_wrong"),
        &ckpt,
        &options("starling-dev/x"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(
        err.to_string()
            .contains("Invalid credentials in Authorization header"),
        "{err}"
    );
    assert!(matches!(err, HubError::Status { tries: 1, .. }), "{err:?}");

    let err = publish(&client(&running, READER), &ckpt, &options("starling-dev/x"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");

    // A namespace the token cannot write to: the repo cannot be created.
    let err = publish(&client(&running, WRITER), &ckpt, &options("meta-llama/x"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("\"meta-llama\""), "{err}");
    assert!(running.hub.repo("meta-llama/x").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_that_keeps_failing_is_given_up_on_with_its_last_answer() {
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let ckpt = checkpoint(dir.path());
    for _ in 0..6 {
        running.hub.inject(
            Endpoint::Preupload,
            Fault::Status {
                status: 500,
                retry_after: None,
            },
        );
    }
    let err = publish(
        &client(&running, WRITER),
        &ckpt,
        &options("starling-dev/down"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Status {
                status: 500,
                tries: 6,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(checkpoint_commits(&running, "starling-dev/down").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_refuses_a_request_that_carries_the_hub_token() {
    // So the tests above, which upload through it, prove the token never reaches it.
    let dir = tempfile::tempdir().unwrap();
    let running = double(dir.path()).await;
    let answer = reqwest::Client::new()
        .get(format!("{}/lfs/{}", running.storage_url, "0".repeat(64)))
        .bearer_auth(WRITER)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains("Only one auth mechanism allowed")
    );
}
