//! Connecting to `respwatchd`: `host:port` or `unix:/path`, optionally over TLS.
use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use respwatch_proto::v1::observer_client::ObserverClient;
use secrecy::ExposeSecret;
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// A connection to the daemon; every call carries the bearer token, if any.
pub type Client = ObserverClient<InterceptedService<Channel, BearerToken>>;

/// How to reach the daemon (global flags).
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// The daemon's gRPC address: host:port or unix:/path.
    #[arg(
        long,
        global = true,
        env = "RESPWATCH_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    pub server: String,
    /// Use TLS, trusting this PEM CA for the daemon's certificate.
    #[arg(long, global = true, env = "RESPWATCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) when the daemon requires one (with --tls-key).
    #[arg(long, global = true, env = "RESPWATCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for --tls-cert.
    #[arg(long, global = true, env = "RESPWATCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify in the daemon's certificate (default: the host of --server).
    #[arg(long, global = true, env = "RESPWATCH_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Bearer token for a daemon run with `--authz kubernetes`. Default: the token of the
    /// current kubeconfig user (as kubectl sends it), sent only over TLS or to a loopback or
    /// unix address.
    #[arg(
        long,
        global = true,
        env = "RESPWATCH_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token (a projected service account token, for instance).
    #[arg(long, global = true, env = "RESPWATCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ServerArgs {
    /// The token to send: `--token`, `--token-file`, or the kubeconfig user's, where safe.
    fn bearer_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_owned()));
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            return Ok(Some(token.trim().to_owned()));
        }
        let protected = self.tls_ca.is_some()
            || self.server.starts_with("unix:")
            || self
                .server
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|addr| addr.ip().is_loopback())
            || self.server.starts_with("localhost:");
        Ok(protected.then(kubeconfig_token).flatten())
    }
}

/// The current kubeconfig user's static token (`token` or `tokenFile`), as kubectl reads it.
fn kubeconfig_token() -> Option<String> {
    let config = kube::config::Kubeconfig::read().ok()?;
    let context = config.current_context.as_ref()?;
    let user = config
        .contexts
        .iter()
        .find(|named| &named.name == context)?
        .context
        .as_ref()?
        .user
        .clone()?;
    let auth = config
        .auth_infos
        .iter()
        .find(|named| named.name == user)?
        .auth_info
        .as_ref()?;
    match (&auth.token, &auth.token_file) {
        (Some(token), _) => Some(token.expose_secret().trim().to_owned()),
        (None, Some(file)) => std::fs::read_to_string(file)
            .ok()
            .map(|token| token.trim().to_owned()),
        (None, None) => None,
    }
}

/// The error shown when the daemon cannot be reached: one line, naming the address and what
/// to try.
#[derive(Debug)]
pub struct Unreachable {
    pub server: String,
    pub cause: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach respwatchd at {} ({}); is it running there? Point --server (or RESPWATCH_SERVER) at its --grpc-listen address",
            self.server, self.cause
        )
    }
}

impl std::error::Error for Unreachable {}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

pub async fn connect(args: &ServerArgs) -> anyhow::Result<Client> {
    let token = match args.bearer_token()? {
        Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
            anyhow::anyhow!("the bearer token has characters a header cannot carry")
        })?),
        None => None,
    };
    let unix = args.server.strip_prefix("unix:").map(PathBuf::from);
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = match &unix {
        Some(_) => format!("{scheme}://localhost"),
        None => format!("{scheme}://{}", args.server),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|_| {
            anyhow::anyhow!(
                "invalid --server {:?}: expected host:port or unix:/path",
                args.server
            )
        })?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some(ca) = &args.tls_ca {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &args.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    }
    let connected = match unix {
        Some(path) => {
            endpoint
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
        None => endpoint.connect().await,
    };
    let channel = connected.map_err(|error| Unreachable {
        server: args.server.clone(),
        cause: root_cause(&error),
    })?;
    Ok(
        ObserverClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(64 << 20),
    )
}

/// Turns a gRPC error into a one-line message (unavailable → [`Unreachable`]).
pub fn status_error(server: &str, status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => Unreachable {
            server: server.to_owned(),
            cause: status.message().to_owned(),
        }
        .into(),
        code => anyhow::anyhow!("respwatchd at {server}: {code:?}: {}", status.message()),
    }
}
