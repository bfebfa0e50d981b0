//! Logs and traces, set up the same way in every Starling process (operator, agent,
//! exchange, trainers, evaluators): readable logs on stderr and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span exported over OTLP/gRPC, named by
//! `OTEL_SERVICE_NAME` and described by `OTEL_RESOURCE_ATTRIBUTES` (the standard
//! variables; unset, nothing is exported and nothing is paid). Trace context crosses gRPC
//! as W3C `traceparent` metadata ([`inject`], [`follow`]), so a round is one trace across
//! its peers and the exchange.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The variable that turns export on.
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// Keeps the exporter alive; dropping it sends the spans still buffered.
#[must_use = "dropping it stops the export of traces"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("traces: the last spans were not sent: {e}");
        }
    }
}

/// Logs to stderr filtered by `RUST_LOG` (else `default_filter`), and traces to the OTLP
/// endpoint if one is configured, as `service` unless `OTEL_SERVICE_NAME` says otherwise.
/// An endpoint that cannot be used is reported and tracing goes on without it: traces
/// are never a reason for a trainer not to train.
pub fn init(service: &str, default_filter: &str) -> Tracing {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let provider = match exporting(service) {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!("traces: not exported ({OTLP_ENDPOINT}): {e}");
            None
        }
    };
    let traces = (provider.as_ref())
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("starling")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .init();
    Tracing { provider }
}

/// A tracer provider exporting over OTLP/gRPC, when the environment asks for one.
fn exporting(service: &str) -> Result<Option<SdkTracerProvider>, Box<dyn std::error::Error>> {
    if std::env::var_os(OTLP_ENDPOINT).is_none_or(|e| e.is_empty()) {
        return Ok(None);
    }
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os(SERVICE_NAME).is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let exporter = OwnRuntime::new()?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The OTLP exporter on a runtime of its own: the SDK exports from a plain thread, and
/// tonic needs a Tokio runtime to make and use its connection.
#[derive(Debug)]
struct OwnRuntime {
    exporter: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl OwnRuntime {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        let exporter = {
            let _inside = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?
        };
        Ok(Self { exporter, runtime })
    }
}

impl SpanExporter for OwnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        self.runtime.block_on(self.exporter.export(batch))
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.exporter.set_resource(resource);
    }
}

/// This process's `OTEL_*` settings for the pods it makes (the exchange's, a member's
/// trainers'), which then export where it does; each pod keeps its own service name.
pub fn forwarded_env() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("OTEL_") && k != SERVICE_NAME)
        .collect();
    vars.sort();
    vars
}

/// On a reply that names the exchange's span of a round: which round.
pub const ROUND_METADATA: &str = "starling-round";

/// Puts `span`'s context on a call's or reply's metadata (nothing when it is not traced).
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut Metadata(metadata));
}

/// Makes `span` a child of the span a call's or reply's metadata names, if it names one.
pub fn follow(span: &tracing::Span, metadata: &MetadataMap) {
    if let Some(cx) = remote(metadata) {
        // Fails only when `span` is disabled (not traced): nothing to link then.
        let _ = span.set_parent(cx);
    }
}

/// The remote span context a call's or reply's metadata carries.
pub fn remote(metadata: &MetadataMap) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(&MetadataRef(metadata));
    cx.span().span_context().is_valid().then_some(cx)
}

struct Metadata<'a>(&'a mut MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataRef<'a>(&'a MetadataMap);

impl Extractor for MetadataRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        (self.0.keys())
            .map(|k| match k {
                KeyRef::Ascii(k) => k.as_str(),
                KeyRef::Binary(k) => k.as_str(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn a_span_context_crosses_grpc_metadata_intact() {
        let sent = SpanContext::new(
            TraceId::from(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            SpanId::from(0x1122_3344_5566_7788),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sent.clone());
        let mut metadata = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Metadata(&mut metadata));
        assert_eq!(
            metadata.get("traceparent").unwrap(),
            "00-0123456789abcdef0123456789abcdef-1122334455667788-01"
        );
        let got = remote(&metadata).unwrap();
        assert_eq!(got.span().span_context().trace_id(), sent.trace_id());
        assert_eq!(got.span().span_context().span_id(), sent.span_id());
    }

    #[test]
    fn metadata_without_a_trace_or_with_a_broken_one_names_no_parent() {
        assert!(remote(&MetadataMap::new()).is_none());
        let mut broken = MetadataMap::new();
        broken.insert("traceparent", MetadataValue::from_static("00-nonsense-01"));
        assert!(remote(&broken).is_none());
    }
}
