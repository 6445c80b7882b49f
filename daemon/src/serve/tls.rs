//! TLS for the gRPC port that follows its files: Kubernetes updates a mounted Secret in place
//! (a new directory, then its `..data` symlink swapped), so certificates are rotated without a
//! restart. Before each handshake the files' identities are compared with the ones loaded (at
//! most once a second); when they changed, the configuration is built again, and new connections
//! get the new certificate (open ones keep theirs). A half-written update that does not load is
//! skipped with a warning, and the last good configuration stays.
use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::TlsFiles;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Files are looked at no more often than this.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies a file's content without reading it: where the path leads, and when and how
/// big it was written.
type Stamp = Vec<(u64, u64, i64, i64, u64)>;

pub struct ReloadingTls {
    files: TlsFiles,
    current: Mutex<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamp: Stamp,
    checked: Instant,
}

impl ReloadingTls {
    /// Loads the files now: a configuration that does not load fails startup.
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let stamp = stamp(&files);
        let acceptor = load(&files)?;
        Ok(Self {
            files,
            current: Mutex::new(Loaded {
                acceptor,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The acceptor for the next connection, rebuilt first if the files changed.
    fn acceptor(&self) -> TlsAcceptor {
        // Nothing here panics while holding the lock; were it poisoned, its value is whole.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.checked.elapsed() >= CHECK_INTERVAL {
            current.checked = Instant::now();
            let now = stamp(&self.files);
            if now != current.stamp {
                match load(&self.files) {
                    Ok(acceptor) => {
                        tracing::info!(
                            "TLS files changed: new connections get the new certificate"
                        );
                        current.acceptor = acceptor;
                        current.stamp = now;
                    }
                    Err(error) => tracing::warn!(
                        error = format!("{error:#}"),
                        "TLS files changed but do not load (yet): keeping the previous ones"
                    ),
                }
            }
        }
        current.acceptor.clone()
    }

    /// Accepts TCP connections and hands on those whose handshake completed; a client that
    /// fails or stalls its handshake is dropped without holding up the others.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "gRPC accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                if tx.is_closed() {
                    return; // the server is gone
                }
                let acceptor = self.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
            .unwrap_or_default()
    })
    .collect()
}

fn load(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("certificates in {}", files.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {}",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .with_context(|| format!("private key in {}", files.key.display()))?;
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
                roots
                    .add(cert.with_context(|| format!("certificates in {}", ca.display()))?)
                    .with_context(|| format!("a CA certificate in {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
