//! Names for remote peers anywhere in the cluster: Service cluster IPs (what a client connects
//! to behind kube-proxy) and EndpointSlice endpoints (pod IPs, with their pod and Service). Two
//! cluster-wide watches that keep only IP → name, bounded by [`MAX_PEER_IPS`].
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::RwLock,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// IP addresses kept at most per source (Services, endpoints); further ones stay unnamed, so a
/// huge cluster costs bounded memory.
pub const MAX_PEER_IPS: usize = 200_000;

/// What a peer IP is, as far as the cluster says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerName {
    /// `namespace/pod` of an endpoint backed by a pod.
    pub pod: Option<String>,
    /// `namespace/service` of a cluster IP, or of the Service an endpoint belongs to.
    pub service: Option<String>,
}

/// IPs named by one kind of object, replaced object by object.
#[derive(Debug, Default)]
struct Source {
    by_ip: HashMap<IpAddr, PeerName>,
    /// Which IPs each object (`namespace/name`) contributed, to undo them on update or delete.
    owned: HashMap<String, Vec<IpAddr>>,
}

impl Source {
    fn apply(&mut self, key: String, names: Vec<(IpAddr, PeerName)>) {
        self.remove(&key);
        let mut ips = Vec::with_capacity(names.len());
        for (ip, name) in names {
            if self.by_ip.len() >= MAX_PEER_IPS && !self.by_ip.contains_key(&ip) {
                break;
            }
            self.by_ip.insert(ip, name);
            ips.push(ip);
        }
        self.owned.insert(key, ips);
    }

    fn remove(&mut self, key: &str) {
        for ip in self.owned.remove(key).unwrap_or_default() {
            self.by_ip.remove(&ip);
        }
    }

    /// After a re-list: forgets the objects that were not listed.
    fn retain(&mut self, listed: &HashSet<String>) {
        let gone: Vec<String> = self
            .owned
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Services,
    Endpoints,
}

#[derive(Debug, Default)]
pub struct PeerIndex {
    services: RwLock<Source>,
    endpoints: RwLock<Source>,
}

impl PeerIndex {
    fn source(&self, kind: PeerKind) -> &RwLock<Source> {
        match kind {
            PeerKind::Services => &self.services,
            PeerKind::Endpoints => &self.endpoints,
        }
    }

    pub fn apply(&self, kind: PeerKind, key: String, names: Vec<(IpAddr, PeerName)>) {
        if let Ok(mut source) = self.source(kind).write() {
            source.apply(key, names);
        }
    }

    pub fn remove(&self, kind: PeerKind, key: &str) {
        if let Ok(mut source) = self.source(kind).write() {
            source.remove(key);
        }
    }

    pub fn retain_listed(&self, kind: PeerKind, listed: &HashSet<String>) {
        if let Ok(mut source) = self.source(kind).write() {
            source.retain(listed);
        }
    }

    /// The cluster's name for `ip`: a Service's cluster IP first, else an endpoint.
    pub fn lookup(&self, ip: &IpAddr) -> Option<PeerName> {
        let service = self
            .services
            .read()
            .ok()
            .and_then(|source| source.by_ip.get(ip).cloned());
        service.or_else(|| {
            self.endpoints
                .read()
                .ok()
                .and_then(|source| source.by_ip.get(ip).cloned())
        })
    }
}

/// `namespace/name` of an object.
pub fn object_key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or_default(),
        name.unwrap_or_default()
    )
}

/// A Service's cluster IPs (none for headless Services).
pub fn service_names(service: &Service) -> Vec<(IpAddr, PeerName)> {
    let name = object_key(
        service.metadata.namespace.as_deref(),
        service.metadata.name.as_deref(),
    );
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    // `clusterIPs` holds `clusterIP` too (first); older objects may only have `clusterIP`.
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if let Ok(ip) = ip.parse()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips.into_iter()
        .map(|ip| {
            let service = Some(name.clone());
            (ip, PeerName { pod: None, service })
        })
        .collect()
}

/// The endpoints of a slice: each address with its pod (`targetRef`) and Service (the
/// `kubernetes.io/service-name` label).
pub fn endpoint_names(slice: &EndpointSlice) -> Vec<(IpAddr, PeerName)> {
    let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get("kubernetes.io/service-name"))
        .map(|name| format!("{namespace}/{name}"));
    let mut names = Vec::new();
    for endpoint in &slice.endpoints {
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| {
                let name = target.name.as_deref()?;
                let pod_namespace = target.namespace.as_deref().unwrap_or(namespace);
                Some(format!("{pod_namespace}/{name}"))
            });
        for address in &endpoint.addresses {
            if let Ok(ip) = address.parse() {
                let name = PeerName {
                    pod: pod.clone(),
                    service: service.clone(),
                };
                names.push((ip, name));
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn names_from_services_and_endpoint_slices() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "redis", "namespace": "data"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"]}
        }))
        .unwrap();
        let names = service_names(&service);
        assert_eq!(names.len(), 2);
        assert_eq!(names[0].1.service.as_deref(), Some("data/redis"));

        let endpoints = slice(serde_json::json!({
            "metadata": {"name": "redis-abcde", "namespace": "data",
                         "labels": {"kubernetes.io/service-name": "redis"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.7"], "targetRef": {"kind": "Pod", "name": "redis-0", "namespace": "data"}},
                {"addresses": ["192.168.1.9"]}
            ]
        }));
        let index = PeerIndex::default();
        index.apply(PeerKind::Services, "data/redis".into(), names);
        index.apply(
            PeerKind::Endpoints,
            "data/redis-abcde".into(),
            endpoint_names(&endpoints),
        );
        let pod = index.lookup(&"10.244.1.7".parse().unwrap()).unwrap();
        assert_eq!(pod.pod.as_deref(), Some("data/redis-0"));
        assert_eq!(pod.service.as_deref(), Some("data/redis"));
        let external = index.lookup(&"192.168.1.9".parse().unwrap()).unwrap();
        assert_eq!(
            (external.pod, external.service.as_deref()),
            (None, Some("data/redis"))
        );
        assert_eq!(
            index
                .lookup(&"10.96.0.10".parse().unwrap())
                .and_then(|name| name.service),
            Some("data/redis".into())
        );

        // An update replaces what the slice said; a re-list without it forgets it.
        index.apply(PeerKind::Endpoints, "data/redis-abcde".into(), Vec::new());
        assert_eq!(index.lookup(&"10.244.1.7".parse().unwrap()), None);
        index.retain_listed(PeerKind::Services, &HashSet::new());
        assert_eq!(index.lookup(&"10.96.0.10".parse().unwrap()), None);
    }
}
