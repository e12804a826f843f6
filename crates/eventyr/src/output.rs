//! What the CLI prints: events as JSON lines on standard output, errors on standard
//! error with their stable code.

use std::io::{self, BufWriter, Stdout, Write};

use eventyr_bus::BusError;
use eventyr_core::{CloudEvent, RecordedEvent};
use eventyr_store::StoreError;
use serde::Serialize;

use crate::cli::{Format, FormatArgs};

/// Prints an error chain; store and bus errors lead with their stable code.
pub fn report(error: &anyhow::Error) {
    let code = error.chain().find_map(|e| {
        e.downcast_ref::<StoreError>()
            .map(StoreError::code)
            .or_else(|| e.downcast_ref::<BusError>().map(BusError::code))
            .or_else(|| {
                e.downcast_ref::<eventyr_saga::EngineError>()
                    .map(eventyr_saga::EngineError::code)
            })
    });
    match code {
        Some(code) => eprintln!("error[{code}]: {error:#}"),
        None => eprintln!("error: {error:#}"),
    }
}

/// Writes one JSON document per line. A closed pipe (`| head`) ends the output quietly.
pub struct Lines {
    out: BufWriter<Stdout>,
    format: Format,
    source: String,
    flush_each: bool,
}

impl Lines {
    pub fn new(format: &FormatArgs, flush_each: bool) -> Self {
        Self {
            out: BufWriter::new(io::stdout()),
            format: format.format,
            source: format.source.clone(),
            flush_each,
        }
    }

    /// Lines of plain JSON documents (no events).
    pub fn json_only() -> Self {
        Self {
            out: BufWriter::new(io::stdout()),
            format: Format::Envelope,
            source: String::new(),
            flush_each: false,
        }
    }

    /// Prints an event; `Ok(false)` when the reader has gone away.
    pub fn event(&mut self, event: &RecordedEvent) -> anyhow::Result<bool> {
        match self.format {
            Format::Envelope => self.json(event),
            Format::Cloudevents => self.json(&CloudEvent::from_recorded(event, &self.source)),
        }
    }

    pub fn json<T: Serialize>(&mut self, value: &T) -> anyhow::Result<bool> {
        let written = serde_json::to_writer(&mut self.out, value)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .and_then(|()| {
                if self.flush_each {
                    self.out.flush()
                } else {
                    Ok(())
                }
            });
        match written {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        match self.out.flush() {
            Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(error.into()),
            _ => Ok(()),
        }
    }
}
