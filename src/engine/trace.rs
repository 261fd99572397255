//! The trace context a request's frames and result carry on.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `traceparent`/`tracestate` of `span`, for messages published later on its behalf.
pub fn context_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut map);
    map
}
