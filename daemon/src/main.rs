//! `respwatchd`: the respwatch node daemon.
use std::{process::ExitCode, sync::atomic::Ordering};

use clap::Parser;
use respwatch_common::LossReason;
use respwatchd::{
    capture::{Capture, CaptureConfig},
    pipeline::Pipeline,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing_subscriber::EnvFilter;

/// Watches Redis (RESP) traffic of every process on this node with eBPF.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Size of the kernel-to-user ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, env = "RESPWATCH_RING_BYTES", default_value_t = 64 * 1024 * 1024)]
    ring_bytes: u32,
    /// Log filter, e.g. `info` or `respwatchd=debug`.
    #[arg(long, env = "RESPWATCH_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("respwatchd: invalid --log filter {:?}: {error}", args.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("respwatchd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("respwatchd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let capture = Capture::start(&CaptureConfig { ring_bytes: args.ring_bytes })?;
    tracing::info!(programs = capture.attached().len(), "eBPF programs attached");
    let pipeline = Pipeline::new(capture);
    let (stop, stopped) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let counters = pipeline.counters();
    let task = tokio::spawn(pipeline.run(stopped, |_| {}));
    tracing::info!("respwatchd ready");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop.send(true);
    // The pipeline owns the capture: when it returns, the programs are detached.
    task.await??;
    tracing::info!(
        records = counters.records.load(Ordering::Relaxed),
        chunks = counters.chunks.load(Ordering::Relaxed),
        bytes = counters.bytes.load(Ordering::Relaxed),
        lost_bytes = counters.lost_bytes.load(Ordering::Relaxed),
        ring_full = counters.kernel_losses[LossReason::RingFull as usize].load(Ordering::Relaxed),
        "eBPF programs detached; bye"
    );
    Ok(())
}
