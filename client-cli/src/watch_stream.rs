//! A Watch stream that outlives its connection: the daemon closes every gRPC connection after
//! its maximum age (`--max-connection-age-seconds`), and restarts or network blips break them
//! too. When the connection breaks under a stream, it is opened again (same filters, without
//! `--last`, which would repeat what was shown) and the gap is reported in the output. Answers
//! of the daemon itself (denied, bad filter, too many subscribers) end it as before.
use std::time::Duration;

use respwatch_proto::v1;
use tokio::time::Instant;
use tonic::{Status, codec::Streaming};

use crate::client::{ServerArgs, Unreachable, connect, status_error};

/// How long a broken stream is retried before the watch gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// First pause between attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

pub struct WatchStream {
    server: ServerArgs,
    request: v1::WatchRequest,
    stream: Streaming<v1::WatchResponse>,
}

/// What a [`WatchStream`] yields.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "messages are nearly all of the traffic; boxing would allocate for each"
)]
pub enum WatchItem {
    Message(v1::WatchResponse),
    /// The connection broke and a new stream is open: commands in between were not seen.
    Reconnected {
        cause: String,
        gap: Duration,
    },
}

impl WatchStream {
    /// Opens the Watch; an unreachable daemon or a refusal is an error at once.
    pub async fn open(server: &ServerArgs, request: v1::WatchRequest) -> anyhow::Result<Self> {
        let stream = open_stream(server, &request).await?;
        Ok(WatchStream {
            server: server.clone(),
            request: v1::WatchRequest { last: 0, ..request },
            stream,
        })
    }

    /// The next message, or the notice of a reconnection; `None` when the daemon ended the
    /// stream (it is shutting down).
    pub async fn next(&mut self) -> anyhow::Result<Option<WatchItem>> {
        let status = match self.stream.message().await {
            Ok(message) => return Ok(message.map(WatchItem::Message)),
            Err(status) if connection_broke(&status) => status,
            Err(status) => return Err(status_error(&self.server.server, status)),
        };
        let cause = status.message().to_owned();
        let broke = Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            match open_stream(&self.server, &self.request).await {
                Ok(stream) => {
                    self.stream = stream;
                    return Ok(Some(WatchItem::Reconnected {
                        cause,
                        gap: broke.elapsed(),
                    }));
                }
                Err(error) if error.is::<Unreachable>() && broke.elapsed() < RECONNECT_FOR => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(error) => {
                    return Err(error.context(format!(
                        "the stream from {} broke ({cause}) and could not be opened again",
                        self.server.server
                    )));
                }
            }
        }
    }
}

async fn open_stream(
    server: &ServerArgs,
    request: &v1::WatchRequest,
) -> anyhow::Result<Streaming<v1::WatchResponse>> {
    let mut client = connect(server).await?;
    Ok(client
        .watch(request.clone())
        .await
        .map_err(|status| status_error(&server.server, status))?
        .into_inner())
}

/// Whether the connection failed under the stream, rather than the daemon answering: a status
/// made from a transport error carries that error as its source.
fn connection_broke(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some()
}
