//! Logs and traces.
//!
//! Logs go to stderr, readable by default or JSON lines (`--log-format json`), levels by
//! `RUST_LOG`. Traces are exported over OTLP only when the standard `OTEL_*` variables ask
//! for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, or
//! `OTEL_TRACES_EXPORTER=otlp`; `OTEL_TRACES_EXPORTER=none` turns them off); the protocol
//! follows `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`, `http/json`). W3C trace
//! context travels in NATS headers (`traceparent`, `tracestate`), so one trace runs from
//! the bridge through the worker to each runtime command.

use std::io::IsTerminal;

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet sent (a short
/// `ops` run would otherwise exit before its spans leave).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.force_flush() {
                eprintln!("millracer: warning: cannot flush traces: {err}");
            }
            let _ = provider.shutdown();
        }
    }
}

/// Whether the `OTEL_*` environment asks for trace export.
pub fn otlp_requested() -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => false,
        Some("otlp") => true,
        _ => {
            var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    }
}

fn exporter() -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    if protocol.eq_ignore_ascii_case("grpc") {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
    }
}

/// Installs logging (and tracing export when asked). `default_level` applies when
/// `RUST_LOG` is unset: the worker says what it does (`info`); the bridge stays quiet
/// (`warn`) so its stderr only carries what the reference prints there.
pub fn init(format: LogFormat, default_level: &str, service_name: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // async-nats logs every (re)connect at info; its warnings are what an operator needs.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},async_nats=warn")));
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    let mut provider = None;
    let mut otel_error = None;
    if otlp_requested() {
        match exporter() {
            Ok(exporter) => {
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(
                        std::env::var("OTEL_SERVICE_NAME")
                            .unwrap_or_else(|_| service_name.to_string()),
                    )
                    .build();
                provider = Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                );
            }
            Err(err) => otel_error = Some(err.to_string()),
        }
    }
    let otel = provider.as_ref().map(|p| {
        // Our own spans are exported whatever RUST_LOG says about log lines; the HTTP and
        // gRPC stacks' spans are not (the exporter would otherwise trace itself).
        let ours = tracing_subscriber::filter::Targets::new()
            .with_target("millracer", tracing::Level::INFO);
        tracing_subscriber::Layer::with_filter(
            tracing_opentelemetry::layer().with_tracer(p.tracer("millracer")),
            ours,
        )
    });
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(text.map(|l| l.with_filter_boxed(filter_clone(&filter))))
        .with(json.map(|l| l.with_filter_boxed(filter_clone(&filter))))
        .try_init();
    if let Some(err) = otel_error {
        tracing::warn!(%err, "OTLP trace export requested but cannot start; traces are off");
    }
    Telemetry { provider }
}

fn filter_clone(filter: &EnvFilter) -> EnvFilter {
    EnvFilter::new(filter.to_string())
}

trait BoxedFilter<S> {
    fn with_filter_boxed(
        self,
        filter: EnvFilter,
    ) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;
}

impl<S, L> BoxedFilter<S> for L
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S> + Send + Sync + 'static,
{
    fn with_filter_boxed(
        self,
        filter: EnvFilter,
    ) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync> {
        Box::new(tracing_subscriber::Layer::with_filter(self, filter))
    }
}
