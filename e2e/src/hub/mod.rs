//! A Hugging Face Hub double: the endpoints Starling's publisher and the official
//! `huggingface_hub` client use to upload (`repos/create`, `preupload`, the Git LFS batch
//! API with basic and multipart transfers, NDJSON commits, tags) and to download
//! (`revision`, `tree`, `resolve` with `X-Repo-Commit` and ETags, LFS files redirected to
//! a separate storage listener), with bearer tokens that read or write, the Hub's error
//! codes and shapes, and faults a test injects (statuses with `Retry-After`, a connection
//! cut mid-upload, a writer racing the next commit, a commit that lands but answers 500).
//!
//! Storage listens on the same port range under another host name (`localhost` when the
//! Hub is `127.0.0.1`), so clients treat it as the CDN it stands for: they follow the
//! redirect without the token, and it refuses any request that carries one, as S3 does.

mod api;
mod download;
mod repo;
mod storage;
mod upload;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use repo::{Commit, Entry, Repo};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
}

/// A user a token stands for, and the namespaces it writes to besides its own.
#[derive(Clone, Debug)]
pub struct Account {
    pub user: String,
    pub role: Role,
    pub orgs: Vec<String>,
}

impl Account {
    fn writes_to(&self, namespace: &str) -> bool {
        self.role == Role::Write
            && (self.user == namespace || self.orgs.iter().any(|o| o == namespace))
    }
}

/// The endpoints a fault can strike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    CreateRepo,
    Preupload,
    LfsBatch,
    /// A basic PUT or a part PUT on storage.
    LfsUpload,
    Commit,
    Tag,
}

/// What goes wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with `Retry-After: N` when given) instead of serving.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Read half the upload, then drop the connection without an answer.
    Cut,
    /// Another writer commits to the branch first, so the commit's parent is stale.
    Race,
    /// The commit lands, but the answer is a 500 (as when a proxy times out).
    LandThenFail,
}

/// Sizes that decide how LFS uploads go.
#[derive(Clone, Copy, Debug)]
pub struct Transfers {
    /// Files at least this large are uploaded in parts.
    pub multipart_from: u64,
    pub part_size: u64,
}

impl Default for Transfers {
    fn default() -> Self {
        Transfers {
            multipart_from: 20 << 20,
            part_size: 8 << 20,
        }
    }
}

/// The Hub double; cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct HubDouble {
    inner: Arc<Inner>,
}

struct Inner {
    data: PathBuf,
    accounts: HashMap<String, Account>,
    transfers: Mutex<Transfers>,
    state: Mutex<State>,
    faults: Mutex<VecDeque<(Endpoint, Fault)>>,
    /// `METHOD /path` of every request served, Hub and storage, in order.
    log: Mutex<Vec<String>>,
    /// `http://127.0.0.1:port` and `http://localhost:port`, once started.
    urls: Mutex<(String, String)>,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    repos: BTreeMap<String, Repo>,
    /// Multipart uploads under way: their parts by number.
    #[serde(skip)]
    uploads: HashMap<String, Upload>,
}

#[derive(Clone, Debug)]
struct Upload {
    sha256: String,
    size: u64,
    parts: BTreeMap<u32, Vec<u8>>,
}

/// A started double.
pub struct RunningHub {
    pub url: String,
    pub storage_url: String,
    pub hub: HubDouble,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl HubDouble {
    /// A double keeping repos and blobs under `data` (reloaded if already there).
    pub fn new(data: &Path, accounts: HashMap<String, Account>) -> std::io::Result<Self> {
        std::fs::create_dir_all(data.join("blobs"))?;
        let state = match std::fs::read(data.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        Ok(HubDouble {
            inner: Arc::new(Inner {
                data: data.to_owned(),
                accounts,
                transfers: Mutex::new(Transfers::default()),
                state: Mutex::new(state),
                faults: Mutex::new(VecDeque::new()),
                log: Mutex::new(Vec::new()),
                urls: Mutex::new(Default::default()),
            }),
        })
    }

    /// Uploads of `multipart_from` bytes and more go in parts of `part_size`.
    pub fn set_transfers(&self, transfers: Transfers) {
        *self
            .inner
            .transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = transfers;
    }

    fn transfers(&self) -> Transfers {
        *self
            .inner
            .transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the Hub on `127.0.0.1:port` and storage on a free port of `localhost`.
    pub async fn start(self, port: u16) -> std::io::Result<RunningHub> {
        let hub_tcp = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let storage_tcp = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://127.0.0.1:{}", hub_tcp.local_addr()?.port());
        let storage_url = format!("http://localhost:{}", storage_tcp.local_addr()?.port());
        *self.lock_urls() = (url.clone(), storage_url.clone());
        let hub_app = api::router(self.clone());
        let storage_app = storage::router(self.clone());
        let tasks = vec![
            tokio::spawn(async move {
                let _ = axum::serve(hub_tcp, hub_app).await;
            }),
            tokio::spawn(async move {
                let listener = storage::CutListener(storage_tcp);
                let app = storage_app.into_make_service_with_connect_info::<storage::Cut>();
                let _ = axum::serve(listener, app).await;
            }),
        ];
        Ok(RunningHub {
            url,
            storage_url,
            hub: self,
            tasks,
        })
    }

    /// The next request to `endpoint` meets `fault` (faults are met in the order added).
    pub fn inject(&self, endpoint: Endpoint, fault: Fault) {
        self.lock_faults().push_back((endpoint, fault));
    }

    /// Faults injected and not met yet.
    pub fn faults_left(&self) -> usize {
        self.lock_faults().len()
    }

    /// `METHOD /path` of every request served so far.
    pub fn requests(&self) -> Vec<String> {
        self.inner
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, method: &axum::http::Method, uri: &axum::http::Uri) {
        let line = format!("{method} {}", uri.path());
        self.inner
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    fn take_fault(&self, endpoint: Endpoint) -> Option<Fault> {
        let mut faults = self.lock_faults();
        let i = faults.iter().position(|(e, _)| *e == endpoint)?;
        faults.remove(i).map(|(_, f)| f)
    }

    /// A copy of `repo` (`namespace/name`), if it exists.
    pub fn repo(&self, repo: &str) -> Option<Repo> {
        self.lock_state().repos.get(repo).cloned()
    }

    /// The stored content of a blob.
    pub fn blob(&self, sha256: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.blob_path(sha256))
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.inner.data.join("blobs").join(sha256)
    }

    fn has_blob(&self, sha256: &str, size: u64) -> bool {
        std::fs::metadata(self.blob_path(sha256)).is_ok_and(|m| m.len() == size)
    }

    /// Stores `bytes` if they hash to `sha256` (an upload of a claimed object).
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), String> {
        let actual = sha256_of(bytes);
        if actual != sha256 {
            return Err(format!("content hashes to {actual}, not {sha256}"));
        }
        self.write_blob(sha256, bytes)
    }

    /// Stores `bytes` under their SHA-256, which it returns.
    fn store(&self, bytes: &[u8]) -> Result<String, String> {
        let sha256 = sha256_of(bytes);
        self.write_blob(&sha256, bytes)?;
        Ok(sha256)
    }

    fn write_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), String> {
        let path = self.blob_path(sha256);
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| e.to_string())
    }

    fn account(&self, token: Option<&str>) -> Option<&Account> {
        self.inner.accounts.get(token?)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_faults(&self) -> std::sync::MutexGuard<'_, VecDeque<(Endpoint, Fault)>> {
        self.inner.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_urls(&self) -> std::sync::MutexGuard<'_, (String, String)> {
        self.inner.urls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the repos to `state.json` (blobs are written as they arrive).
    fn save(&self, state: &State) {
        let path = self.inner.data.join("state.json");
        let tmp = path.with_extension("partial");
        if let Ok(bytes) = serde_json::to_vec(state) {
            let _ = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        }
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    repo::hex(&sha2::Sha256::digest(bytes))
}

/// Parses `TOKEN:USER:read|write[:ORG,ORG]`.
pub fn parse_account(s: &str) -> Result<(String, Account), String> {
    let mut parts = s.splitn(4, ':');
    let (Some(token), Some(user), Some(role)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("`{s}`: expected TOKEN:USER:read|write[:ORG,ORG]"));
    };
    let role = match role {
        "read" => Role::Read,
        "write" => Role::Write,
        other => return Err(format!("`{other}`: a role is read or write")),
    };
    let orgs = parts
        .next()
        .map(|o| o.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    Ok((
        token.to_owned(),
        Account {
            user: user.to_owned(),
            role,
            orgs,
        },
    ))
}
