//! Where the exchange keeps what must outlive its pod — the global state, its settings,
//! the aggregation residual, the ledger — and, with a bucket, the rounds' payloads.
//!
//! One code path: a local directory and an S3, GCS or Azure bucket are both an
//! [`ObjectStore`]. Only a bucket signs URLs, so only with one do peers move payloads
//! without the exchange (`PUT` and `GET` on URLs that expire, never the credentials);
//! with a directory the exchange streams payloads itself, as it always has.
//!
//! Every operation runs on a small runtime of its own, so the exchange's synchronous code
//! (a round's close persists its state under the global lock) can wait for one without
//! blocking the runtime that serves gRPC on it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, RetryConfig, WriteMultipart,
};

pub mod s3_server;

/// Objects above this size are written in parts of it.
const PART_BYTES: usize = 64 << 20;

/// How long a signed URL handed to a peer stays valid.
pub const URL_EXPIRY: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage {url:?}: {message}")]
    Open { url: String, message: String },
    #[error("{op} {key} in {storage}: {source}")]
    Op {
        op: &'static str,
        key: String,
        storage: String,
        source: Box<object_store::Error>,
    },
    #[error("storage {0}: the operation was cancelled")]
    Cancelled(String),
}

/// Where a run's bucket is and how to sign in to it. Opened again on every retry, so
/// credentials fixed while the exchange waits for its storage are picked up.
#[derive(Clone, Debug)]
pub struct StorageSource {
    /// `s3://bucket/prefix`, `gs://…` or `az://…`.
    pub url: String,
    /// An S3-compatible server (MinIO, R2, moto) instead of AWS.
    pub endpoint: Option<String>,
    pub credentials: Credentials,
}

/// How the exchange signs in to its bucket.
#[derive(Clone)]
pub enum Credentials {
    /// The cloud's own environment variables (`AWS_ACCESS_KEY_ID`, …) or the node's
    /// identity.
    Environment,
    /// A directory of files each named by the setting it holds (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`,
    /// …): a mounted Secret, read again on every open.
    Dir(std::path::PathBuf),
    /// These settings, named as in the directory.
    Given(Vec<(String, String)>),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Environment => f.write_str("Environment"),
            Self::Dir(dir) => write!(f, "Dir({})", dir.display()),
            Self::Given(settings) => {
                let names: Vec<_> = settings.iter().map(|(k, _)| k.as_str()).collect();
                write!(f, "Given({names:?})")
            }
        }
    }
}

impl Credentials {
    /// The settings they give, lowercase as `object_store` names its configuration keys.
    fn settings(&self) -> Result<Vec<(String, String)>, String> {
        let given = match self {
            Self::Environment => vec![],
            Self::Given(settings) => settings.clone(),
            Self::Dir(dir) => {
                let entries =
                    std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let mut settings = vec![];
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // A mounted Secret's own bookkeeping (`..data`, timestamped dirs).
                    if name.starts_with('.') || !entry.path().is_file() {
                        continue;
                    }
                    let value = std::fs::read_to_string(entry.path())
                        .map_err(|e| format!("{}: {e}", entry.path().display()))?;
                    settings.push((name, value.trim().to_owned()));
                }
                settings
            }
        };
        Ok(given
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect())
    }
}

impl StorageSource {
    /// The storage, signed in with the credentials as they are now.
    pub fn open(&self) -> Result<Storage, StorageError> {
        let settings = (self.credentials.settings()).map_err(|message| StorageError::Open {
            url: self.url.clone(),
            message,
        })?;
        Storage::open(&self.url, self.endpoint.as_deref(), &settings)
    }
}

impl StorageError {
    /// Whether the object the operation needed is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Op { source, .. } if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

/// A directory or a bucket (with a prefix inside it), and a signer when it is a bucket.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    prefix: Path,
    /// The URL or directory, for messages.
    name: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// The runtime every storage operation runs on; never dropped, so a `Storage` may be
/// dropped anywhere.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("storage")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("starting the storage runtime: {e}"))
    })
}

/// `builder` with `settings` applied by its own `with_config` (`set`); an unknown
/// setting is named.
fn configured<B, K: std::str::FromStr>(
    builder: B,
    settings: &[(String, String)],
    set: impl Fn(B, K, &str) -> B,
) -> Result<B, String> {
    settings.iter().try_fold(builder, |b, (key, value)| {
        let key = (key.parse()).map_err(|_| format!("{key:?} is not a setting of this storage"))?;
        Ok(set(b, key, value))
    })
}

/// Storage answers within a minute or is retried (5xx, timeouts, resets) for up to two.
fn client_options() -> (ClientOptions, RetryConfig) {
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        // A whole request, body included: a part of PART_BYTES on a slow link.
        .with_timeout(Duration::from_secs(600))
        .with_allow_http(true);
    let retry = RetryConfig {
        max_retries: 8,
        retry_timeout: Duration::from_secs(120),
        ..RetryConfig::default()
    };
    (client, retry)
}

impl Storage {
    /// The directory `dir`, created if missing.
    pub fn local(dir: &std::path::Path) -> Result<Self, StorageError> {
        let open = |e: &dyn std::fmt::Display| StorageError::Open {
            url: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open(&e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| open(&e))?
            .with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(store),
            signer: None,
            prefix: Path::default(),
            name: dir.display().to_string(),
        })
    }

    /// The bucket `url` (`s3://bucket/prefix`, `gs://…`, `az://…`), credentials from the
    /// environment as each cloud's own tools read them (`AWS_ACCESS_KEY_ID`, …) unless
    /// `settings` (`object_store`'s lowercase configuration keys: `aws_access_key_id`, …)
    /// say otherwise, and `endpoint` for an S3-compatible server (MinIO, R2, moto).
    fn open(
        url: &str,
        endpoint: Option<&str>,
        settings: &[(String, String)],
    ) -> Result<Self, StorageError> {
        let open = |message: String| StorageError::Open {
            url: url.to_string(),
            message,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| open(e.to_string()))?;
        let prefix =
            Path::parse(parsed.path().trim_matches('/')).map_err(|e| open(e.to_string()))?;
        let (client, retry) = client_options();
        // Each cloud's builder, with the same options, settings and result.
        macro_rules! bucket {
            ($builder:expr) => {{
                let b = ($builder).with_client_options(client).with_retry(retry);
                let b = configured(b, settings, |b, k, v| b.with_config(k, v)).map_err(open)?;
                let s = Arc::new(b.build().map_err(|e| open(e.to_string()))?);
                (s.clone() as Arc<dyn ObjectStore>, s as Arc<dyn Signer>)
            }};
        }
        let (store, signer) = match parsed.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                if let Some(endpoint) = endpoint {
                    // An S3-compatible server names buckets in the path, not the host.
                    b = (b.with_endpoint(endpoint)).with_virtual_hosted_style_request(false);
                }
                bucket!(b)
            }
            "gs" => bucket!(object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url)),
            "az" | "abfs" | "abfss" => {
                bucket!(object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url))
            }
            other => {
                return Err(open(format!(
                    "unknown scheme {other:?}: use s3://, gs:// or az://"
                )));
            }
        };
        Ok(Self {
            store,
            signer: Some(signer),
            prefix,
            name: url.to_string(),
        })
    }

    /// Whether peers can move payloads here themselves (a bucket, not a directory).
    pub fn signs_urls(&self) -> bool {
        self.signer.is_some()
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.child(part))
    }

    fn op_error(
        &self,
        op: &'static str,
        key: &str,
    ) -> impl Fn(object_store::Error) -> StorageError + use<> {
        let (key, storage) = (key.to_string(), self.name.clone());
        move |source| StorageError::Op {
            op,
            key: key.clone(),
            storage: storage.clone(),
            source: Box::new(source),
        }
    }

    /// Runs `work` on the storage runtime and waits for it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        (runtime().spawn(work).await).map_err(|_| StorageError::Cancelled(self.name.clone()))?
    }

    /// Writes `bytes` at `key`, replacing what was there only once all of it is written;
    /// in parts above [`PART_BYTES`], as S3 takes no single PUT above 5 GB.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let (store, path, err) = (
            self.store.clone(),
            self.path(key),
            self.op_error("writing", key),
        );
        self.run(async move {
            if bytes.len() <= PART_BYTES {
                store
                    .put(&path, PutPayload::from_bytes(bytes))
                    .await
                    .map_err(err)?;
                return Ok(());
            }
            let upload = store.put_multipart(&path).await.map_err(&err)?;
            let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            for part in bytes.chunks(PART_BYTES) {
                parts.wait_for_capacity(4).await.map_err(&err)?;
                parts.write(part);
            }
            parts.finish().await.map_err(err)?;
            Ok(())
        })
        .await
    }

    /// The object at `key` if it is exactly `size` bytes long, reading no more than that;
    /// `Ok(Err(its size))` when it is not, `Ok(Ok(None))` when there is none.
    pub async fn get_sized(
        &self,
        key: &str,
        size: u64,
    ) -> Result<Result<Option<Bytes>, u64>, StorageError> {
        let (store, path, err) = (
            self.store.clone(),
            self.path(key),
            self.op_error("reading", key),
        );
        self.run(async move {
            let options = GetOptions {
                range: (size > 0).then_some(GetRange::Bounded(0..size)),
                ..GetOptions::default()
            };
            let got = match store.get_opts(&path, options).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(Ok(None)),
                Err(e) => return Err(err(e)),
            };
            if got.meta.size != size {
                return Ok(Err(got.meta.size));
            }
            Ok(Ok(Some(got.bytes().await.map_err(err)?)))
        })
        .await
    }

    /// Copies the object at `from` to `to`, inside the storage.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let (store, from_path, to_path) = (self.store.clone(), self.path(from), self.path(to));
        let err = self.op_error("copying", from);
        self.run(async move { store.copy(&from_path, &to_path).await.map_err(err) })
            .await
    }

    /// The object at `key`; `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let (store, path, err) = (
            self.store.clone(),
            self.path(key),
            self.op_error("reading", key),
        );
        self.run(async move {
            match store.get(&path).await {
                Ok(got) => Ok(Some(got.bytes().await.map_err(err)?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        let (store, path) = (self.store.clone(), self.path(prefix));
        let err = self.op_error("deleting", prefix);
        self.run(async move {
            let listed = store
                .list(Some(&path))
                .map(|meta| meta.map(|m| m.location))
                .boxed();
            let mut deleted = store.delete_stream(listed);
            while let Some(done) = deleted.next().await {
                match done {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(err(e)),
                }
            }
            Ok(())
        })
        .await
    }

    /// The names of the "directories" right under `prefix`.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (store, path) = (self.store.clone(), self.path(prefix));
        let err = self.op_error("listing", prefix);
        self.run(async move {
            let listed = store.list_with_delimiter(Some(&path)).await.map_err(err)?;
            let names = (listed.common_prefixes.iter())
                .filter_map(|p| p.filename().map(str::to_owned))
                .collect();
            Ok(names)
        })
        .await
    }

    /// A URL that lets its holder `method` (`PUT` or `GET`) the object at `key` for
    /// [`URL_EXPIRY`]; `None` for a directory.
    pub async fn signed_url(
        &self,
        method: reqwest::Method,
        key: &str,
    ) -> Result<Option<String>, StorageError> {
        let Some(signer) = self.signer.clone() else {
            return Ok(None);
        };
        let (path, err) = (self.path(key), self.op_error("signing a URL for", key));
        self.run(async move {
            let url = signer
                .signed_url(method, &path, URL_EXPIRY)
                .await
                .map_err(err)?;
            Ok(Some(url.to_string()))
        })
        .await
    }

    /// Writes, reads back and deletes a small object, and signs a URL: whether the
    /// credentials and the bucket work, with the storage's own answer when they do not.
    pub async fn check(&self) -> Result<(), StorageError> {
        const KEY: &str = "starling-check";
        self.signed_url(reqwest::Method::PUT, KEY).await?;
        let bytes = Bytes::from_static(b"starling");
        self.put(KEY, bytes.clone()).await?;
        match self.get(KEY).await? {
            Some(read) if read == bytes => {}
            _ => {
                return Err(StorageError::Open {
                    url: self.name.clone(),
                    message: "an object written could not be read back".into(),
                });
            }
        }
        self.delete(KEY).await
    }

    /// Deletes the object at `key`, if there is one.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let (store, path, err) = (
            self.store.clone(),
            self.path(key),
            self.op_error("deleting", key),
        );
        self.run(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    /// [`Storage::put`] for synchronous code.
    pub fn put_blocking(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        futures::executor::block_on(self.put(key, bytes))
    }

    /// [`Storage::get`] for synchronous code.
    pub fn get_blocking(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        futures::executor::block_on(self.get(key))
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests;
