//! The bearer-token check in front of every call.

use tonic::{Request, Status};

use super::super::{Reason, Refusal, Tokens};

/// Maps the bearer token of every call to its [`Identity`](super::super::Identity), or
/// refuses the call.
#[derive(Clone)]
pub struct Authenticate(pub(super) Tokens);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let identity = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.0.identify(t))
            .ok_or_else(|| {
                Refusal::new(
                    Reason::Unauthenticated,
                    "missing or unknown bearer token for this run",
                )
            })?;
        req.extensions_mut().insert(identity);
        Ok(req)
    }
}
