//! Requests to the Hub, retried the way its own client retries them: on 408, 429 and
//! 5xx answers and on dropped connections, after `Retry-After` when the Hub gives one,
//! else with doubling back-off. The token goes to the Hub's own URLs only, never to the
//! storage URLs LFS hands out (they are pre-signed, and S3 refuses a second credential).

use std::time::Duration;

use crate::exchange::tls::ClientTls;

use super::HubError;

/// How often and how patiently a request is retried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait after the first failure; it doubles up to `max_wait`.
    pub first_wait: Duration,
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            first_wait: Duration::from_millis(500),
            max_wait: Duration::from_secs(8),
        }
    }
}

/// The longest `Retry-After` honoured; a longer one is a reason to fail and be retried
/// later by whoever runs the publisher, not to hold a connection for an hour.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Whether a request carries the Hub token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Auth {
    Hub,
    /// A pre-signed storage URL: the URL is the credential.
    Storage,
}

/// A Hub endpoint and the token to use there.
#[derive(Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    http: reqwest::Client,
    retry: Retry,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl Hub {
    /// A client for `endpoint` (e.g. [`DEFAULT_ENDPOINT`]).
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self, HubError> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(HubError::BadEndpoint(endpoint));
        }
        Self::build(endpoint, token, reqwest::Client::builder())
    }

    /// A client for a run's exchange at `endpoint`, trusting only the run's CA and
    /// verifying the name `tls` says (the dialled address is resolved to, so the
    /// certificate need not name it).
    pub fn for_exchange(endpoint: &str, token: String, tls: &ClientTls) -> Result<Self, HubError> {
        let bad = |e: &dyn std::fmt::Display| HubError::BadEndpoint(format!("{endpoint}: {e}"));
        let ca = reqwest::Certificate::from_pem(&tls.ca).map_err(|e| bad(&e))?;
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca);
        let mut url = reqwest::Url::parse(endpoint).map_err(|e| bad(&e))?;
        if let Some(name) = &tls.server_name {
            let host = url.host_str().unwrap_or_default().to_owned();
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs: Vec<std::net::SocketAddr> =
                std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map_err(|e| bad(&e))?
                    .collect();
            builder = builder.resolve_to_addrs(name, &addrs);
            url.set_host(Some(name)).map_err(|e| bad(&e))?;
        }
        Self::build(
            url.as_str().trim_end_matches('/').to_owned(),
            Some(token),
            builder,
        )
    }

    fn build(
        endpoint: String,
        token: Option<String>,
        builder: reqwest::ClientBuilder,
    ) -> Result<Self, HubError> {
        let http = builder
            .user_agent(concat!("starling/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // Between bytes, not in all: a large file may take an hour on a home link.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| HubError::transport("building the HTTP client", &e))?;
        Ok(Hub {
            endpoint,
            token: token.filter(|t| !t.is_empty()),
            http,
            retry: Retry::default(),
        })
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `path` (starting with `/`) on the Hub.
    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    /// Sends the request `build` makes (once per try), retrying what may pass, and
    /// returns the first successful answer or the Hub's refusal.
    pub(super) async fn send(
        &self,
        what: &str,
        auth: Auth,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HubError> {
        let mut wait = self.retry.first_wait;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut request = build(&self.http);
            if let (Auth::Hub, Some(token)) = (auth, &self.token) {
                request = request.bearer_auth(token);
            }
            let last = tries >= self.retry.attempts.max(1);
            let pause = match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) if retryable(response.status()) && !last => {
                    let after = retry_after(&response);
                    tracing::warn!(what, status = %response.status(), tries, "the Hub asks to retry");
                    after.unwrap_or(wait)
                }
                Ok(response) => return Err(HubError::refused(what, response, tries).await),
                Err(e) if !last && !e.is_builder() => {
                    tracing::warn!(what, error = %e.without_url(), tries, "retrying");
                    wait
                }
                Err(e) => return Err(HubError::transport(what, &e)),
            };
            tokio::time::sleep(pause).await;
            wait = (wait * 2).min(self.retry.max_wait);
        }
    }

    /// [`Hub::send`], then the answer's JSON body.
    pub(super) async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        auth: Auth,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<T, HubError> {
        let response = self.send(what, auth, build).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| HubError::transport(what, &e))?;
        serde_json::from_slice(&bytes).map_err(|e| HubError::Malformed {
            what: what.to_owned(),
            message: e.to_string(),
        })
    }
}

/// What the Hub's own client retries: timeouts, rate limits and server errors.
fn retryable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After: <seconds>`, or the IETF draft's `RateLimit: "api";r=0;t=<seconds>` the
/// Hub sends with 429s; one second is added, as a reset at `t` is not yet a reset.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let header = |name: &str| response.headers().get(name)?.to_str().ok();
    let seconds = header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| {
            header("ratelimit")?
                .split(';')
                .find_map(|part| part.trim().strip_prefix("t=")?.parse::<u64>().ok())
        })?;
    Some(Duration::from_secs(seconds + 1).min(MAX_RETRY_AFTER))
}

impl HubError {
    /// The Hub's refusal, with its message: `X-Error-Message`, else the body's `error`.
    async fn refused(what: &str, response: reqwest::Response, tries: u32) -> HubError {
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let code = header("x-error-code");
        let from_header = header("x-error-message");
        let body = response.bytes().await.unwrap_or_default();
        let message = from_header
            .or_else(|| error_in_body(&body))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
        HubError::Status {
            what: what.to_owned(),
            status,
            code,
            message,
            tries,
        }
    }

    pub(super) fn transport(what: &str, e: &reqwest::Error) -> HubError {
        // The chain says why (refused, reset, timed out); the URL may be pre-signed.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        if let Some(url) = e.url() {
            message = message.replace(url.as_str(), "<url>");
        }
        HubError::Transport {
            what: what.to_owned(),
            message,
        }
    }
}

/// `{"error": "..."}`, `{"error": ["..."]}` or `{"errors": [{"message": "..."}]}`.
fn error_in_body(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str().or_else(|| i.get("message")?.as_str()))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    };
    v.get("error")
        .and_then(text)
        .or_else(|| v.get("errors").and_then(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_error_shapes_all_give_their_message() {
        assert_eq!(
            error_in_body(br#"{"error":"Repository not found"}"#).as_deref(),
            Some("Repository not found")
        );
        assert_eq!(
            error_in_body(br#"{"error":["a","b"]}"#).as_deref(),
            Some("a; b")
        );
        assert_eq!(
            error_in_body(br#"{"errors":[{"message":"bad yaml"}]}"#).as_deref(),
            Some("bad yaml")
        );
        assert_eq!(error_in_body(b"<html>"), None);
    }

    #[test]
    fn only_web_urls_are_endpoints() {
        assert!(Hub::new("https://huggingface.co/", None).is_ok());
        let err = Hub::new("huggingface.co", None).unwrap_err();
        assert!(err.to_string().contains("huggingface.co"), "{err}");
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let hub = Hub::new(DEFAULT_ENDPOINT, Some("hf_secret".into())).unwrap();
        assert!(!format!("{hub:?}").contains("hf_secret"));
    }
}
