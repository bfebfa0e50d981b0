//! The storage the double's LFS URLs point at: pre-signed PUTs (whole or in parts, then
//! a completion POST) and the GETs downloads are redirected to. Like S3 it refuses a
//! request that carries an `Authorization` header besides the URL's own signature, so a
//! client that leaks the Hub token to storage fails here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::{Endpoint, Fault, HubDouble, Upload};

pub fn router(hub: HubDouble) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(hub)
}

/// Cuts the connection it came in on: every later read or write fails, so the client
/// sees the connection die mid-request, without an answer.
#[derive(Clone)]
pub struct Cut(Arc<AtomicBool>);

impl Cut {
    fn cut(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A TCP stream that can be cut from a handler.
pub struct CuttableStream {
    tcp: TcpStream,
    cut: Arc<AtomicBool>,
}

fn refused<T>(cut: &AtomicBool) -> Option<Poll<std::io::Result<T>>> {
    cut.load(Ordering::SeqCst)
        .then(|| Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into())))
}

impl AsyncRead for CuttableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(r) = refused(&self.cut) {
            return r;
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(r) = refused(&self.cut) {
            return r;
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

pub struct CutListener(pub TcpListener);

impl axum::serve::Listener for CutListener {
    type Io = CuttableStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((tcp, addr)) = self.0.accept().await {
                let cut = Arc::new(AtomicBool::new(false));
                return (CuttableStream { tcp, cut }, addr);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CutListener>> for Cut {
    fn connect_info(stream: axum::serve::IncomingStream<'_, CutListener>) -> Self {
        Cut(stream.io().cut.clone())
    }
}

fn answer(status: StatusCode, message: &str) -> Response {
    let body = format!("<Error><Code>{status}</Code><Message>{message}</Message></Error>");
    (status, [("content-type", "application/xml")], body).into_response()
}

async fn handle(
    State(hub): State<HubDouble>,
    ConnectInfo(cut): ConnectInfo<Cut>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    hub.record(&method, &uri);
    if headers.contains_key("authorization") {
        return answer(
            StatusCode::BAD_REQUEST,
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, \
             Signature query string parameter or the Authorization header should be specified",
        );
    }
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET, ["lfs", sha256]) => match hub.blob(sha256) {
            Ok(bytes) => (StatusCode::OK, bytes).into_response(),
            Err(_) => answer(StatusCode::NOT_FOUND, "NoSuchKey"),
        },
        (Method::PUT, ["upload", id]) => put_whole(&hub, id, body, &cut).await,
        (Method::PUT, ["upload", id, "part", n]) => match n.parse() {
            Ok(n) => put_part(&hub, id, n, body, &cut).await,
            Err(_) => answer(StatusCode::BAD_REQUEST, "InvalidPart"),
        },
        (Method::POST, ["upload", id, "complete"]) => complete(&hub, id),
        _ => answer(StatusCode::NOT_FOUND, "NoSuchKey"),
    }
}

/// An upload's body, or `None` when a fault cut the connection halfway through it.
async fn read_upload(hub: &HubDouble, body: Body, expected: u64, cut: &Cut) -> Option<Vec<u8>> {
    let cut_at = match hub.take_fault(Endpoint::LfsUpload) {
        Some(Fault::Cut) => Some(expected / 2),
        _ => None,
    };
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.ok()?);
        if cut_at.is_some_and(|at| bytes.len() as u64 >= at) {
            cut.cut();
            return None;
        }
    }
    Some(bytes)
}

/// Stores an upload's whole content, if it hashes to its object id, and closes it.
fn finish(hub: &HubDouble, id: &str, upload: &Upload, bytes: &[u8]) -> Response {
    match hub.put_blob(&upload.sha256, bytes) {
        Ok(()) => {
            hub.lock_state().uploads.remove(id);
            StatusCode::OK.into_response()
        }
        Err(e) => answer(StatusCode::BAD_REQUEST, &format!("BadDigest: {e}")),
    }
}

fn pending(hub: &HubDouble, id: &str) -> Option<Upload> {
    hub.lock_state().uploads.get(id).cloned()
}

async fn put_whole(hub: &HubDouble, id: &str, body: Body, cut: &Cut) -> Response {
    let Some(upload) = pending(hub, id) else {
        return answer(StatusCode::FORBIDDEN, "SignatureDoesNotMatch");
    };
    let Some(bytes) = read_upload(hub, body, upload.size, cut).await else {
        return answer(StatusCode::BAD_REQUEST, "IncompleteBody");
    };
    finish(hub, id, &upload, &bytes)
}

async fn put_part(hub: &HubDouble, id: &str, n: u32, body: Body, cut: &Cut) -> Response {
    let Some(upload) = pending(hub, id) else {
        return answer(StatusCode::FORBIDDEN, "SignatureDoesNotMatch");
    };
    let part = hub.transfers().part_size;
    let Some(bytes) = read_upload(hub, body, part.min(upload.size), cut).await else {
        return answer(StatusCode::BAD_REQUEST, "IncompleteBody");
    };
    use sha2::Digest;
    let etag = format!(
        "\"{}\"",
        &super::repo::hex(&sha2::Sha256::digest(&bytes))[..32]
    );
    if let Some(u) = hub.lock_state().uploads.get_mut(id) {
        u.parts.insert(n, bytes);
    }
    (StatusCode::OK, [("etag", etag)]).into_response()
}

/// Joins the parts in order and stores the object if it is whole.
fn complete(hub: &HubDouble, id: &str) -> Response {
    let Some(upload) = pending(hub, id) else {
        return answer(StatusCode::NOT_FOUND, "NoSuchUpload");
    };
    let bytes: Vec<u8> = upload.parts.values().flatten().copied().collect();
    if bytes.len() as u64 != upload.size {
        return answer(StatusCode::BAD_REQUEST, "InvalidPart: parts missing");
    }
    finish(hub, id, &upload, &bytes)
}
