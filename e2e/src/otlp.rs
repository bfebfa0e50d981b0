//! A small OTLP/gRPC trace receiver, standing in for an OpenTelemetry collector: the
//! processes of a local federation export their spans to it, and tests read what
//! arrived (names, attributes and parent links).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tonic::{Request, Response, Status};

/// One span as received.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    /// Empty for a root span.
    pub parent_span_id: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// The exporting process's resource attributes.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

/// The receiver, listening on loopback until dropped.
pub struct Receiver {
    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` is set to.
    pub endpoint: String,
    spans: Received,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Received::default();
        let service = TraceServiceServer::new(Collect(spans.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tokio::spawn(async move {
            let serve = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming);
            if let Err(e) = serve.await {
                eprintln!("the OTLP receiver stopped: {e}");
            }
        });
        Ok(Self {
            endpoint,
            spans,
            server,
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Collect(Received);

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = vec![];
        for resource in request.into_inner().resource_spans {
            let described = resource.resource.map(|r| attributes(&r.attributes));
            let described = described.unwrap_or_default();
            let service = described.get("service.name").cloned().unwrap_or_default();
            let spans = resource.scope_spans.into_iter().flat_map(|s| s.spans);
            received.extend(spans.map(|s| ReceivedSpan {
                service: service.clone(),
                resource: described.clone(),
                attributes: attributes(&s.attributes),
                name: s.name,
                trace_id: s.trace_id,
                span_id: s.span_id,
                parent_span_id: s.parent_span_id,
            }));
        }
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(received);
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Attributes as text (numbers and booleans as they print).
fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    let text = |v: &any_value::Value| match v {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    };
    (list.iter())
        .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?))))
        .collect()
}
