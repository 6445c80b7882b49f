//! Bench builds only (the `record-dump` feature): every ring record the pipeline takes, written
//! to `$RESPWATCH_RECORD_DUMP` as it was in the ring (a little-endian `u32` length, then the
//! bytes), oldest first, so that the pipeline bench can replay real traffic through the
//! daemon's own entry point. The file holds payloads, values included: never in a build a user
//! runs.
use std::{
    cell::RefCell,
    fs::File,
    io::{BufWriter, Write},
};

use super::Record;

pub struct RecordDump(RefCell<BufWriter<File>>);

impl RecordDump {
    /// The dump `$RESPWATCH_RECORD_DUMP` names, created (truncated) now.
    pub fn from_env() -> std::io::Result<Option<Self>> {
        let Some(path) = std::env::var_os("RESPWATCH_RECORD_DUMP") else {
            return Ok(None);
        };
        tracing::warn!(path = %path.to_string_lossy(), "writing every ring record, payloads included");
        Ok(Some(Self(RefCell::new(BufWriter::new(File::create(
            path,
        )?)))))
    }

    /// A batch's records as they were in the rings, in time order.
    pub fn write(&self, mut raws: Vec<&[u8]>) {
        raws.sort_by_key(|raw| Record::timestamp(raw));
        let mut out = self.0.borrow_mut();
        for raw in raws {
            let written = out
                .write_all(&(raw.len() as u32).to_le_bytes())
                .and_then(|()| out.write_all(raw));
            if let Err(error) = written {
                tracing::warn!(%error, "writing the record dump");
                return;
            }
        }
    }
}

impl Drop for RecordDump {
    fn drop(&mut self) {
        if let Err(error) = self.0.get_mut().flush() {
            tracing::warn!(%error, "flushing the record dump");
        }
    }
}
