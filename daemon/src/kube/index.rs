//! The node's pods, by UID, container id, name and IP: what the attributor looks up for each
//! event. Fed by the pod watcher; readers take a short read lock and clone an `Arc`.
//!
//! Misses are never cached: an event whose pod is not known yet is looked up again on the next
//! event. Deleted pods stay resolvable for a grace period, so the last commands of a pod that
//! is going away (and the rows they made) keep their names.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

/// Pod labels.
pub type Labels = BTreeMap<String, String>;

/// What the attributor needs to know about one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: Arc<Labels>,
    /// The owning workload's name (a ReplicaSet's Deployment, a StatefulSet, a DaemonSet, a
    /// Job...); empty for bare pods.
    pub workload: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, `CronJob`...
    pub workload_kind: String,
    /// Pod IPs (none for host-network pods: their IP is the node's).
    pub ips: Vec<IpAddr>,
    /// Container runtime id (without the `containerd://` scheme) → container name.
    pub containers: HashMap<String, String>,
}

impl PodMeta {
    /// Extracts what we keep from a full Pod object. `None` without a UID.
    pub fn from_pod(pod: &Pod) -> Option<PodMeta> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let (workload_kind, workload) = owner_workload(pod);
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let mut ips = Vec::new();
        let mut containers = HashMap::new();
        if let Some(status) = &pod.status {
            if !host_network {
                let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
                for ip in status.pod_ip.as_deref().into_iter().chain(listed) {
                    if let Ok(ip) = ip.parse::<IpAddr>()
                        && !ips.contains(&ip)
                    {
                        ips.push(ip);
                    }
                }
            }
            let all = status
                .container_statuses
                .iter()
                .chain(status.init_container_statuses.iter())
                .chain(status.ephemeral_container_statuses.iter())
                .flatten();
            for container in all {
                if let Some(id) = container.container_id.as_deref().and_then(runtime_id) {
                    containers.insert(id.to_owned(), container.name.clone());
                }
            }
        }
        Some(PodMeta {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: Arc::new(meta.labels.clone().unwrap_or_default()),
            workload,
            workload_kind,
            ips,
            containers,
        })
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`.
fn runtime_id(text: &str) -> Option<&str> {
    let id = text.split_once("://").map_or(text, |(_, id)| id);
    (!id.is_empty()).then_some(id)
}

/// The controlling owner, with a ReplicaSet mapped to its Deployment (by stripping the
/// pod-template-hash suffix, as `kubectl` users read it) and a Job created by a CronJob to the
/// CronJob (by stripping the scheduled-time suffix).
fn owner_workload(pod: &Pod) -> (String, String) {
    let owners = pod.metadata.owner_references.iter().flatten();
    let Some(owner) = owners
        .clone()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.clone().next())
    else {
        return (String::new(), String::new());
    };
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match owner.kind.as_str() {
        "ReplicaSet" => match strip_suffix(&owner.name, hash.map(String::as_str)) {
            Some(deployment) => ("Deployment".to_owned(), deployment.to_owned()),
            None => ("ReplicaSet".to_owned(), owner.name.clone()),
        },
        "Job" => {
            // CronJob jobs are named <cronjob>-<minutes since epoch> (8+ digits).
            match owner.name.rsplit_once('-') {
                Some((cron, stamp))
                    if stamp.len() >= 8 && stamp.chars().all(|c| c.is_ascii_digit()) =>
                {
                    ("CronJob".to_owned(), cron.to_owned())
                }
                _ => ("Job".to_owned(), owner.name.clone()),
            }
        }
        kind => (kind.to_owned(), owner.name.clone()),
    }
}

/// `web-5d8f7c9b6` → `web`, using the pod-template-hash label when there is one, else a
/// suffix that looks like one (alphanumeric, 5 to 10 characters).
fn strip_suffix<'a>(name: &'a str, hash: Option<&str>) -> Option<&'a str> {
    if let Some(hash) = hash
        && let Some(base) = name.strip_suffix(hash).and_then(|b| b.strip_suffix('-'))
    {
        return Some(base);
    }
    let (base, suffix) = name.rsplit_once('-')?;
    (hash.is_none()
        && (5..=10).contains(&suffix.len())
        && suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
    .then_some(base)
}

#[derive(Debug)]
struct Entry {
    pod: Arc<PodMeta>,
    deleted_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    by_uid: HashMap<String, Entry>,
    /// (namespace, name) → UID of the newest pod with that name.
    by_name: HashMap<(String, String), String>,
    /// Container id and its 12-character short form → pod UID.
    by_container: HashMap<String, String>,
    by_ip: HashMap<IpAddr, String>,
}

impl Inner {
    fn unlink(&mut self, pod: &PodMeta) {
        let name = (pod.namespace.clone(), pod.name.clone());
        if self.by_name.get(&name) == Some(&pod.uid) {
            self.by_name.remove(&name);
        }
        for id in pod.containers.keys() {
            for key in [id.as_str(), short(id)] {
                if self.by_container.get(key) == Some(&pod.uid) {
                    self.by_container.remove(key);
                }
            }
        }
        for ip in &pod.ips {
            if self.by_ip.get(ip) == Some(&pod.uid) {
                self.by_ip.remove(ip);
            }
        }
    }

    fn link(&mut self, pod: &PodMeta) {
        self.by_name
            .insert((pod.namespace.clone(), pod.name.clone()), pod.uid.clone());
        for id in pod.containers.keys() {
            self.by_container.insert(id.clone(), pod.uid.clone());
            self.by_container
                .insert(short(id).to_owned(), pod.uid.clone());
        }
        for ip in &pod.ips {
            self.by_ip.insert(*ip, pod.uid.clone());
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The index plus the watcher's sync state.
#[derive(Debug)]
pub struct PodIndex {
    inner: RwLock<Inner>,
    /// Remote peers' names (Services, endpoints) from the cluster-wide watches.
    pub peers: super::peers::PeerIndex,
    sync: RwLock<String>,
    grace: Duration,
    /// Changes whenever what a process resolves to may have changed (a pod added, changed or
    /// forgotten), so caches of resolved names know when to look again.
    generation: AtomicU64,
}

impl PodIndex {
    pub fn new(grace: Duration) -> PodIndex {
        PodIndex {
            inner: RwLock::default(),
            peers: super::peers::PeerIndex::default(),
            sync: RwLock::new("syncing".to_owned()),
            grace,
            generation: AtomicU64::new(0),
        }
    }

    /// See [`PodIndex::generation`]'s field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `synced`, `syncing`, `unreachable: <why>`...
    pub fn sync_state(&self) -> String {
        self.sync.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_sync_state(&self, state: impl Into<String>) {
        let state = state.into();
        if let Ok(mut current) = self.sync.write()
            && *current != state
        {
            tracing::info!(kubernetes_sync = %state, "pod watcher");
            *current = state;
        }
    }

    pub fn is_synced(&self) -> bool {
        self.sync.read().is_ok_and(|s| s.as_str() == "synced")
    }

    /// Adds or replaces a pod (a new UID under an old name takes the name over).
    pub fn apply(&self, pod: PodMeta) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        if let Some(old) = inner.by_uid.get(&pod.uid)
            && old.deleted_at.is_none()
            && *old.pod == pod
        {
            return;
        }
        if let Some(old) = inner.by_uid.remove(&pod.uid) {
            inner.unlink(&old.pod);
        }
        self.generation.fetch_add(1, Ordering::Release);
        inner.link(&pod);
        inner.by_uid.insert(
            pod.uid.clone(),
            Entry {
                pod: Arc::new(pod),
                deleted_at: None,
            },
        );
    }

    /// Marks a pod deleted: it stays resolvable for the grace period.
    pub fn delete(&self, uid: &str) {
        self.delete_at(uid, Instant::now());
    }

    fn delete_at(&self, uid: &str, when: Instant) {
        if let Ok(mut inner) = self.inner.write()
            && let Some(entry) = inner.by_uid.get_mut(uid)
            && entry.deleted_at.is_none()
        {
            entry.deleted_at = Some(when);
        }
    }

    /// After a full re-list: pods that were not in it are gone (deleted while we were not
    /// watching, or before a 410 Gone).
    pub fn retain_listed(&self, listed: &HashSet<String>) {
        let now = Instant::now();
        let gone: Vec<String> = self
            .inner
            .read()
            .map(|inner| {
                inner
                    .by_uid
                    .keys()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for uid in gone {
            self.delete_at(&uid, now);
        }
    }

    /// Forgets pods deleted longer than the grace period ago.
    pub fn prune(&self) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let grace = self.grace;
        let expired: Vec<String> = inner
            .by_uid
            .iter()
            .filter(|(_, e)| e.deleted_at.is_some_and(|at| at.elapsed() >= grace))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in expired {
            if let Some(entry) = inner.by_uid.remove(&uid) {
                inner.unlink(&entry.pod);
                self.generation.fetch_add(1, Ordering::Release);
            }
        }
    }

    fn live(&self, entry: &Entry) -> bool {
        entry.deleted_at.is_none_or(|at| at.elapsed() < self.grace)
    }

    fn get_uid(&self, inner: &Inner, uid: &str) -> Option<Arc<PodMeta>> {
        inner
            .by_uid
            .get(uid)
            .filter(|e| self.live(e))
            .map(|e| Arc::clone(&e.pod))
    }

    pub fn by_uid(&self, uid: &str) -> Option<Arc<PodMeta>> {
        let inner = self.inner.read().ok()?;
        self.get_uid(&inner, uid)
    }

    pub fn by_name(&self, namespace: &str, name: &str) -> Option<Arc<PodMeta>> {
        let inner = self.inner.read().ok()?;
        let uid = inner
            .by_name
            .get(&(namespace.to_owned(), name.to_owned()))?;
        self.get_uid(&inner, uid)
    }

    /// By full or 12-character container id.
    pub fn by_container(&self, id: &str) -> Option<Arc<PodMeta>> {
        let inner = self.inner.read().ok()?;
        let uid = inner.by_container.get(id)?;
        self.get_uid(&inner, uid)
    }

    pub fn by_ip(&self, ip: &IpAddr) -> Option<Arc<PodMeta>> {
        let inner = self.inner.read().ok()?;
        let uid = inner.by_ip.get(ip)?;
        self.get_uid(&inner, uid)
    }

    /// Pods currently known (deleted ones in their grace period included).
    pub fn pods(&self) -> Vec<Arc<PodMeta>> {
        self.inner
            .read()
            .map(|inner| {
                inner
                    .by_uid
                    .values()
                    .filter(|e| self.live(e))
                    .map(|e| Arc::clone(&e.pod))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    const ID: &str = "4f0a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";

    fn web(uid: &str, name: &str) -> Pod {
        pod(serde_json::json!({
            "metadata": {
                "uid": uid, "name": name, "namespace": "prod",
                "labels": {"app": "web", "pod-template-hash": "5d8f7c9b6"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-5d8f7c9b6", "uid": "rs", "controller": true}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
            "status": {"podIP": "10.1.2.3", "containerStatuses": [{
                "name": "app", "containerID": format!("containerd://{ID}"),
                "image": "x", "imageID": "y", "ready": true, "restartCount": 0
            }]}
        }))
    }

    #[test]
    fn pod_meta_from_a_full_pod() {
        let meta = PodMeta::from_pod(&web("u1", "web-5d8f7c9b6-abcde")).unwrap();
        assert_eq!(meta.workload_kind, "Deployment");
        assert_eq!(meta.workload, "web");
        assert_eq!(meta.containers.get(ID).map(String::as_str), Some("app"));
        assert_eq!(meta.ips, vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(meta.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn owners() {
        let owned = |kind: &str, name: &str| {
            let p = pod(serde_json::json!({"metadata": {"uid": "u", "name": "p",
                "ownerReferences": [{"apiVersion": "v1", "kind": kind, "name": name,
                    "uid": "o", "controller": true}]}}));
            let meta = PodMeta::from_pod(&p).unwrap();
            (meta.workload_kind, meta.workload)
        };
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(owned("StatefulSet", "db"), pair("StatefulSet", "db"));
        assert_eq!(owned("DaemonSet", "agent"), pair("DaemonSet", "agent"));
        assert_eq!(owned("Job", "migrate"), pair("Job", "migrate"));
        assert_eq!(owned("Job", "backup-28912345"), pair("CronJob", "backup"));
        assert_eq!(
            owned("ReplicaSet", "api-7c9d8b6f5"),
            pair("Deployment", "api")
        );
        let bare = PodMeta::from_pod(&pod(serde_json::json!({"metadata": {"uid": "u"}}))).unwrap();
        assert_eq!(
            (bare.workload_kind.as_str(), bare.workload.as_str()),
            ("", "")
        );
    }

    #[test]
    fn lookups_delete_grace_and_relist() {
        let index = PodIndex::new(Duration::from_millis(50));
        index.apply(PodMeta::from_pod(&web("u1", "web-1")).unwrap());
        assert_eq!(index.by_uid("u1").unwrap().name, "web-1");
        assert_eq!(index.by_container(short(ID)).unwrap().uid, "u1");
        assert_eq!(index.by_name("prod", "web-1").unwrap().uid, "u1");
        assert_eq!(index.by_ip(&"10.1.2.3".parse().unwrap()).unwrap().uid, "u1");
        index.delete("u1");
        assert!(
            index.by_uid("u1").is_some(),
            "resolvable during the grace period"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(index.by_uid("u1").is_none());
        index.prune();
        assert!(index.by_container(ID).is_none());
        // A re-list that no longer has a pod deletes it.
        index.apply(PodMeta::from_pod(&web("u2", "web-2")).unwrap());
        index.retain_listed(&HashSet::new());
        std::thread::sleep(Duration::from_millis(60));
        assert!(index.by_uid("u2").is_none());
    }
}
