//! What the actors report about themselves, caught from their telemetry
//! (tracing) events: restarts, escalations and partition actor starts, each
//! with the simulated host it happened on (turmoil runs each host's tick
//! inside a `node` span named after the host).

use std::sync::Arc;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::Attributes;
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::Shared;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActorEventKind {
    /// A partition actor (re)started; `generation` counts its restarts.
    PartitionStarted { partition: i64, generation: u64 },
    /// A supervisor scheduled a restart of `child` after `delay`.
    RestartScheduled {
        child: String,
        generation: u64,
        delay: Duration,
    },
    /// A supervisor spent `child`'s restart budget.
    Escalated { child: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorEvent {
    pub at: Duration,
    pub host: String,
    /// Which start of the host's software (1 = first).
    pub boot: u32,
    pub kind: ActorEventKind,
}

/// The layer feeding [`Shared`]'s actor events.
pub struct ActorEvents {
    pub shared: Arc<Shared>,
}

struct HostName(String);

/// Only turmoil's host spans and the actors' own events: the rest (every
/// simulated packet is a trace event) would cost time for nothing.
fn wanted(metadata: &tracing::Metadata<'_>) -> bool {
    (metadata.is_span() && metadata.name() == "node")
        || (metadata.is_event() && metadata.target().starts_with("audit_actors"))
}

#[derive(Default)]
struct Fields {
    message: String,
    child: Option<String>,
    name: Option<String>,
    partition: Option<i64>,
    generation: Option<u64>,
    delay_ms: Option<u64>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "child" => self.child = Some(text.trim_matches('"').to_string()),
            "name" => self.name = Some(text.trim_matches('"').to_string()),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "child" => self.child = Some(value.to_string()),
            "name" => self.name = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match field.name() {
            "partition" => self.partition = Some(value),
            "generation" => self.generation = Some(value.max(0) as u64),
            "delay_ms" => self.delay_ms = Some(value.max(0) as u64),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "partition" => self.partition = Some(value as i64),
            "generation" => self.generation = Some(value),
            "delay_ms" => self.delay_ms = Some(value),
            _ => {}
        }
    }
}

impl<S> Layer<S> for ActorEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if wanted(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "node" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(name), Some(span)) = (fields.name, ctx.span(id)) {
            span.extensions_mut().insert(HostName(name));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("audit_actors") {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let kind = match fields.message.as_str() {
            "partition actor started" => ActorEventKind::PartitionStarted {
                partition: fields.partition.unwrap_or(-1),
                generation: fields.generation.unwrap_or(0),
            },
            "actor failed, restarting" => ActorEventKind::RestartScheduled {
                child: fields.child.unwrap_or_default(),
                generation: fields.generation.unwrap_or(0),
                delay: Duration::from_millis(fields.delay_ms.unwrap_or(0)),
            },
            "restart budget spent, escalating to parent" => ActorEventKind::Escalated {
                child: fields.child.unwrap_or_default(),
            },
            _ => return,
        };
        let host = ctx
            .event_scope(event)
            .and_then(|scope| {
                scope
                    .from_root()
                    .find_map(|span| span.extensions().get::<HostName>().map(|h| h.0.clone()))
            })
            .unwrap_or_default();
        self.shared.actor_event(host, kind);
    }
}
