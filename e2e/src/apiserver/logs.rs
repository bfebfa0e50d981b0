//! `pods/log` (`kubectl logs`): as a real API server does, it asks the kubelet of the
//! pod's node (the node's `InternalIP` address and `daemonEndpoints.kubeletEndpoint`
//! port) for the container's log and streams its answer back unchanged.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::ApiServer;
use super::error::ApiError;
use super::http::param;

/// The query parameters passed on to the kubelet.
const PASSED_ON: &[&str] = &["follow", "tailLines", "limitBytes"];

/// Answers `GET .../pods/<name>/log` with what the kubelet of the pod's node says.
pub async fn pod_log(
    server: &ApiServer,
    namespace: &str,
    name: &str,
    q: &[(String, String)],
) -> Result<Response, ApiError> {
    let (container, address) = locate(server, namespace, name, param(q, "container"))?;
    if matches!(param(q, "previous"), Some("true" | "1")) {
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{name}\" not found"
        )));
    }
    let passed: Vec<String> = q
        .iter()
        .filter(|(k, _)| PASSED_ON.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let path = format!(
        "/containerLogs/{namespace}/{name}/{container}?{}",
        passed.join("&")
    );
    let body = ask_kubelet(&address, &path).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(forward(body)))
        .expect("a valid response"))
}

/// The pod's container whose log is asked for, and the `address:port` of the kubelet
/// of the node it runs on.
fn locate(
    server: &ApiServer,
    namespace: &str,
    name: &str,
    asked: Option<&str>,
) -> Result<(String, String), ApiError> {
    let store = server.store();
    let pod = store
        .get_raw("", "pods", namespace, name)
        .ok_or_else(|| ApiError::not_found("pods", name))?;
    let container = container(pod, name, asked)?;
    let node = pod["spec"]["nodeName"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_owned();
    let address = store
        .get_raw("", "nodes", "", &node)
        .and_then(kubelet_address)
        .ok_or_else(|| {
            ApiError::bad_request(format!("node {node} has no kubelet endpoint to ask"))
        })?;
    Ok((container, address))
}

/// Sends `GET path` to the kubelet at `address`: the connection, read up to the body of
/// its answer, or the kubelet's own words as a 400 when it answers anything but 200.
async fn ask_kubelet(address: &str, path: &str) -> Result<BufReader<TcpStream>, ApiError> {
    let unreachable = |e: std::io::Error| {
        ApiError::bad_request(format!("the kubelet at {address} did not answer: {e}"))
    };
    let stream = TcpStream::connect(address).await.map_err(unreachable)?;
    let mut stream = BufReader::new(stream);
    // HTTP/1.0: the kubelet answers with a body that ends when the connection does.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(unreachable)?;
    let status = read_head(&mut stream).await.map_err(unreachable)?;
    if status != 200 {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text).await;
        return Err(ApiError::bad_request(text.trim().to_owned()));
    }
    Ok(stream)
}

/// Reads an HTTP answer's status line and headers: its status code (502 when the line
/// makes no sense), with `stream` left at the start of the body.
async fn read_head(stream: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    loop {
        line.clear();
        let n = stream.read_line(&mut line).await?;
        if n == 0 || line == "\r\n" || line == "\n" {
            return Ok(status);
        }
    }
}

/// The rest of `body` as it arrives, copied by a task of its own until the kubelet
/// closes the connection or the client goes away.
fn forward(
    mut body: BufReader<TcpStream>,
) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match body.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The container asked for, or the pod's only one.
fn container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
    let names: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match (asked, names.as_slice()) {
        (Some(c), _) if names.contains(&c) => Ok(c.to_owned()),
        (Some(c), _) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        (None, [only]) => Ok((*only).to_owned()),
        (None, _) => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            names.join(" ")
        ))),
    }
}

/// `address:port` of a node's kubelet, from its status.
fn kubelet_address(node: &Value) -> Option<String> {
    let status = &node["status"];
    let ip = status["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == "InternalIP")?["address"]
        .as_str()?;
    let port = status["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64()?;
    Some(format!("{ip}:{port}"))
}
