//! What the verbs share: the request's body, options and field manager, and writing
//! (or, for a dry run, pretending to).

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use serde_json::Value;

use super::super::error::ApiError;
use super::super::store::{FieldValidation, Store};
use super::super::{ApiServer, protobuf};
use super::param;

pub(super) fn validation(q: &[(String, String)]) -> FieldValidation {
    match param(q, "fieldValidation") {
        Some("Strict") => FieldValidation::Strict,
        _ => FieldValidation::Ignore,
    }
}

pub(super) fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if content_type.contains("protobuf") {
        protobuf::decode(body).map_err(|refused| match refused {
            protobuf::Refused::Kind(reason) => {
                ApiError::unsupported_media_type(&format!("{content_type}: {reason}"))
            }
            protobuf::Refused::Malformed(e) => invalid_body(e),
        })
    } else if content_type.contains("yaml") {
        serde_yaml::from_slice::<Value>(body).map_err(invalid_body)
    } else {
        serde_json::from_slice::<Value>(body).map_err(invalid_body)
    }
}

pub(super) fn invalid_body(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the request body is not valid: {e}"))
}

/// `dryRun=All`: the write is checked and answered but not kept.
pub(super) fn dry_run(q: &[(String, String)]) -> Result<bool, ApiError> {
    match param(q, "dryRun") {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "Invalid dry run value {other:?}: valid values are All"
        ))),
    }
}

/// Runs a write on the store or, for a dry run, on a scratch copy of it.
pub(super) fn write<T>(server: &ApiServer, dry_run: bool, f: impl FnOnce(&mut Store) -> T) -> T {
    if dry_run {
        f(&mut server.store().scratch())
    } else {
        f(&mut server.store())
    }
}

/// Who is writing: `fieldManager`, else the client's User-Agent up to its first `/`
/// (`kubectl`, `kube-rs`), as a real server names managers.
pub(super) fn field_manager(q: &[(String, String)], headers: &HeaderMap) -> String {
    param(q, "fieldManager")
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            let agent = headers.get(header::USER_AGENT)?.to_str().ok()?;
            let prefix = agent.split('/').next()?.trim();
            (!prefix.is_empty()).then(|| prefix.to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
