//! Kubernetes metadata: a node-scoped pod watcher (`spec.nodeName=<node>`) feeding the
//! [`PodIndex`] the attributor resolves pod UIDs, container ids and pod IPs with.
//!
//! The watcher is `kube::runtime::watcher`: list, then watch from the list's resourceVersion
//! with bookmarks, re-list on 410 Gone. On any error the watcher is dropped and started again
//! (a fresh list) after an exponential, jittered back-off: a node's pods are few, so a re-list is
//! cheap, it catches every change missed while the API server was away, and it gives an exact
//! sync state (`synced` once the list is in). While the API server is unreachable capture goes
//! on; events keep process and container attribution and get pod names once the pods are known
//! (misses are not cached).
pub mod index;
pub mod peers;

use std::{collections::HashSet, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use ::kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use peers::PeerKind;
use tokio::sync::watch as signal;

pub use index::{Labels, PodIndex, PodMeta};

/// `--kubernetes`: whether to watch pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// On when `--kubeconfig` or `$KUBECONFIG` is given or the in-cluster environment is there
    /// (`KUBERNETES_SERVICE_HOST`); otherwise off.
    #[default]
    Auto,
    /// On; startup fails when no configuration is found.
    On,
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err(format!("expected auto, on or off, not {text:?}")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::On => "on",
            Mode::Off => "off",
        })
    }
}

#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub mode: Mode,
    /// A kubeconfig file; without it, the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Only pods of this node are watched.
    pub node_name: String,
    /// How long deleted pods stay resolvable.
    pub pod_grace: Duration,
    /// Longest wait between reconnection attempts.
    pub retry_max: Duration,
}

/// The API client for `config`, or `None` when Kubernetes is off (not configured, in `auto`).
pub async fn client(config: &KubeConfig) -> anyhow::Result<Option<Client>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kube_config = match (config.mode, &config.kubeconfig) {
        (Mode::Off, _) => return Ok(None),
        (_, Some(path)) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        // `$KUBECONFIG`, as kubectl and kube-rs read it (a list of files, merged).
        (_, None) if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) => {
            kube::Config::infer()
                .await
                .context("the kubeconfig in $KUBECONFIG")?
        }
        (Mode::Auto, None) if !in_cluster => return Ok(None),
        (_, None) if in_cluster => kube::Config::incluster()
            .context("in-cluster Kubernetes configuration (service account)")?,
        (_, None) => kube::Config::infer()
            .await
            .context("--kubernetes on: no kubeconfig and no in-cluster environment")?,
    };
    let client = Client::try_from(kube_config).context("Kubernetes API client")?;
    Ok(Some(client))
}

/// Starts the pod watcher and the cluster-wide peer watches (Services, EndpointSlices); they
/// run until `stop` turns true.
pub fn start(
    client: Client,
    config: &KubeConfig,
    index: Arc<PodIndex>,
    stop: signal::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let node = config.node_name.clone();
    let retry_max = config.retry_max;
    tokio::spawn(async move {
        let services = watch_peers(
            Api::<Service>::all(client.clone()),
            Arc::clone(&index),
            PeerKind::Services,
            peers::service_names,
            retry_max,
        );
        let endpoints = watch_peers(
            Api::<EndpointSlice>::all(client.clone()),
            Arc::clone(&index),
            PeerKind::Endpoints,
            peers::endpoint_names,
            retry_max,
        );
        tokio::select! {
            () = watch_pods(client, node, index, retry_max) => {}
            () = services => {}
            () = endpoints => {}
            () = crate::serve::stopped(stop) => {}
        }
    })
}

/// Keeps one kind of peer names current: list + watch, re-list after errors (as the pod
/// watcher does). A cluster without permission for this kind only loses those names.
async fn watch_peers<K>(
    api: Api<K>,
    index: Arc<PodIndex>,
    kind: PeerKind,
    names: fn(&K) -> Vec<(std::net::IpAddr, peers::PeerName)>,
    retry_max: Duration,
) where
    K: ::kube::Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let mut backoff = Backoff::new(retry_max);
    loop {
        let config = watcher::Config::default().timeout(290);
        let mut stream = watcher::watcher(api.clone(), config).boxed();
        let mut listed: Option<HashSet<String>> = None;
        let key = |object: &K| {
            peers::object_key(
                object.meta().namespace.as_deref(),
                object.meta().name.as_deref(),
            )
        };
        let failure = loop {
            match stream.next().await {
                None => break "the watch ended".to_owned(),
                Some(Ok(Event::Init)) => listed = Some(HashSet::new()),
                Some(Ok(Event::InitApply(object) | Event::Apply(object))) => {
                    let object_key = key(&object);
                    if let Some(listed) = &mut listed {
                        listed.insert(object_key.clone());
                    }
                    index.peers.apply(kind, object_key, names(&object));
                }
                Some(Ok(Event::InitDone)) => {
                    if let Some(listed) = listed.take() {
                        index.peers.retain_listed(kind, &listed);
                    }
                    tracing::info!(?kind, "peer names synced");
                    backoff.reset();
                }
                Some(Ok(Event::Delete(object))) => index.peers.remove(kind, &key(&object)),
                Some(Err(error)) => break describe(&error),
            }
        };
        drop(stream);
        let delay = backoff.next_delay();
        tracing::warn!(%failure, ?kind, retry_in = ?delay, "peer watcher: re-listing after a pause");
        tokio::time::sleep(delay).await;
    }
}

async fn watch_pods(client: Client, node: String, index: Arc<PodIndex>, retry_max: Duration) {
    let api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let mut backoff = Backoff::new(retry_max);
    let mut prune = tokio::time::interval(Duration::from_secs(1));
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let config = watcher::Config::default().fields(&selector).timeout(290);
        let mut stream = watcher::watcher(api.clone(), config).boxed();
        let mut listed: Option<HashSet<String>> = None;
        let failure = loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = prune.tick() => {
                    index.prune();
                    continue;
                }
            };
            match next {
                None => break "the watch ended".to_owned(),
                Some(Ok(Event::Init)) => {
                    listed = Some(HashSet::new());
                    index.set_sync_state("syncing");
                }
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some(meta) = PodMeta::from_pod(&pod) {
                        if let Some(listed) = &mut listed {
                            listed.insert(meta.uid.clone());
                        }
                        index.apply(meta);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    if let Some(listed) = listed.take() {
                        index.retain_listed(&listed);
                    }
                    index.set_sync_state("synced");
                    backoff.reset();
                }
                Some(Ok(Event::Apply(pod))) => {
                    if let Some(meta) = PodMeta::from_pod(&pod) {
                        index.apply(meta);
                    }
                }
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        index.delete(uid);
                    }
                }
                Some(Err(error)) => break describe(&error),
            }
        };
        drop(stream);
        index.set_sync_state(failure.clone());
        let delay = backoff.next_delay();
        tracing::warn!(%failure, retry_in = ?delay, "pod watcher: re-listing after a pause");
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                _ = prune.tick() => index.prune(),
            }
        }
    }
}

/// The sync state shown in `GetStatus` after a watcher error.
fn describe(error: &watcher::Error) -> String {
    match error {
        watcher::Error::WatchError(status) if status.code == 410 => {
            format!("resyncing: 410 Gone ({})", status.message)
        }
        other => {
            // The chain down to the root cause ("Connection refused"), without repeats.
            let mut text = format!("unreachable: {other}");
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// Exponential back-off from 250 ms to `max`, with up to 25% jitter so a fleet of daemons
/// does not reconnect in step.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            max: max.max(Self::FIRST),
        }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        base + jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(250) && delays[0] < Duration::from_millis(320));
        assert!(delays[5] >= Duration::from_secs(2) && delays[5] <= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(320));
    }

    #[test]
    fn modes() {
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().is_err());
    }
}
