//! Structured logs: one JSON object a line when standard error is not a terminal,
//! readable text when it is. Each line names the trace, span and request it was
//! written in, taken from the nearest enclosing span that knows them (the spans of
//! [`crate::trace`] record them).

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The span fields a log line inherits.
const INHERITED: [&str; 3] = ["trace_id", "span_id", "request_id"];

/// The ids a span carries, kept as span data for the log lines inside it.
#[derive(Debug, Default, Clone)]
struct Ids([Option<String>; 3]);

impl Visit for Ids {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(slot) = INHERITED.iter().position(|name| *name == field.name()) {
            self.0[slot] = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if INHERITED.contains(&field.name()) {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// Keeps each span's [`Ids`] up to date.
pub(crate) struct IdsLayer;

impl<S> tracing_subscriber::Layer<S> for IdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = Ids::default();
        attributes.record(&mut ids);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(ids) = extensions.get_mut::<Ids>() {
                values.record(ids);
            }
        }
    }
}

/// The JSON line format: `timestamp`, `level`, `target`, `message`, the event's
/// fields, then `trace_id`, `span_id` and `request_id` when a span knows them.
pub(crate) struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut fields = Fields(vec![
            ("timestamp", now.into()),
            ("level", metadata.level().as_str().into()),
            ("target", metadata.target().into()),
        ]);
        event.record(&mut fields);
        let mut inherited = Ids::default();
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                if let Some(ids) = span.extensions().get::<Ids>() {
                    for (slot, value) in inherited.0.iter_mut().zip(&ids.0) {
                        if slot.is_none() {
                            slot.clone_from(value);
                        }
                    }
                }
            }
        }
        // A request handled without a span carries its ids in its task (a `Hop`).
        if inherited.0[0].is_none()
            && let Some((trace, span, request)) = crate::trace::hop_ids()
        {
            inherited.0 = [Some(trace), Some(span), request];
        }
        for (name, value) in INHERITED.iter().zip(inherited.0) {
            if let Some(value) = value
                && !fields.0.iter().any(|(field, _)| field == name)
            {
                fields.0.push((name, value.into()));
            }
        }
        // In the order written: time, level, target and message first.
        let mut line = String::with_capacity(256);
        line.push('{');
        for (index, (name, value)) in fields.0.iter().enumerate() {
            if index > 0 {
                line.push(',');
            }
            line.push_str(&Value::from(*name).to_string());
            line.push(':');
            line.push_str(&value.to_string());
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Formats no fields: span fields are not needed by [`JsonLines`], which writes the
/// event's own.
pub(crate) struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _: Writer<'writer>,
        _: R,
    ) -> fmt::Result {
        Ok(())
    }
}

/// A line's fields as JSON values, in order.
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.push((field.name(), value));
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_the_ids_of_its_spans() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(IdsLayer).with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("outer", request_id = "r-1", trace_id = "t-1");
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner", span_id = "s-2");
            let _inner = inner.enter();
            tracing::warn!(count = 3, ok = true, "it \"happened\"");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["message"], "it \"happened\"");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["count"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["trace_id"], "t-1");
        assert_eq!(line["span_id"], "s-2");
        assert_eq!(line["request_id"], "r-1");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(text.starts_with("{\"timestamp\":"), "{text}");
    }
}
