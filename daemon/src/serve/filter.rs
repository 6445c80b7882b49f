//! `respwatch.v1.Filter`s, parsed once per request and applied to events (Watch) and to
//! aggregation rows (GetStats). Fields inside one filter AND; filters in a list OR; the result
//! is allow − deny.
use std::{collections::BTreeSet, sync::Arc};

use respwatch_proto::v1;
use respwatch_resp::correlate::Role;
use tonic::Status;

use super::authz::Scope;
use crate::{
    aggregate::{RowKey, RowStats},
    enrich::Attributor,
    event::CommandEvent,
};

/// Pod labels, from the pod watcher (none for host processes and pods not known yet, and
/// without Kubernetes).
pub use crate::kube::Labels;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    namespace: Option<String>,
    pod: Option<PodMatch>,
    labels: Vec<Requirement>,
    container: Option<String>,
    pid: Option<u32>,
    comm: Option<String>,
    role: Option<Role>,
    command: Option<String>,
    key_prefix: Option<String>,
    errors_only: bool,
    min_latency_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PodMatch {
    namespace: Option<String>,
    prefix: String,
}

/// One term of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        }
    }

    fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        }
    }

    fn values(&self) -> Vec<&str> {
        match self {
            Requirement::Equals(_, v) | Requirement::NotEquals(_, v) => vec![v],
            Requirement::In(_, vs) | Requirement::NotIn(_, vs) => {
                vs.iter().map(String::as_str).collect()
            }
            Requirement::Exists(_) | Requirement::NotExists(_) => Vec::new(),
        }
    }
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in label selector {text:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in label selector {text:?}"));
    }
    terms.push(&text[start..]);
    Ok(terms)
}

/// Parses a Kubernetes-style label selector: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
/// `a notin (x,y)`, `a`, `!a`, joined by commas.
pub fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in split_terms(text)?
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let bad = || format!("invalid label selector term {term:?}");
        let requirement = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().to_owned())
        } else if let Some((k, rest, negated)) = term
            .split_once(" notin ")
            .map(|(k, r)| (k, r, true))
            .or_else(|| term.split_once(" in ").map(|(k, r)| (k, r, false)))
        {
            let set = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            let values = set.split(',').map(|v| v.trim().to_owned()).collect();
            if negated {
                Requirement::NotIn(k.trim().to_owned(), values)
            } else {
                Requirement::In(k.trim().to_owned(), values)
            }
        } else {
            Requirement::Exists(term.to_owned())
        };
        let key_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        };
        let value_ok = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !key_ok(requirement.key()) || !requirement.values().into_iter().all(value_ok) {
            return Err(bad());
        }
        out.push(requirement);
    }
    Ok(out)
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

impl Filter {
    pub fn parse(proto: &v1::Filter) -> Result<Filter, Status> {
        let pod = non_empty(&proto.pod).map(|pod| match pod.split_once('/') {
            Some((ns, prefix)) => PodMatch {
                namespace: non_empty(ns),
                prefix: prefix.to_owned(),
            },
            None => PodMatch {
                namespace: None,
                prefix: pod,
            },
        });
        let labels = parse_selector(&proto.labels).map_err(Status::invalid_argument)?;
        let role = match v1::Role::try_from(proto.role) {
            Ok(v1::Role::Unspecified) => None,
            Ok(v1::Role::Client) => Some(Role::Client),
            Ok(v1::Role::Server) => Some(Role::Server),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown role {}",
                    proto.role
                )));
            }
        };
        Ok(Filter {
            namespace: proto.namespace.clone(),
            pod,
            labels,
            container: non_empty(&proto.container),
            pid: (proto.pid != 0).then_some(proto.pid),
            comm: non_empty(&proto.comm),
            role,
            command: non_empty(&proto.command.to_ascii_lowercase()),
            key_prefix: non_empty(&proto.key_prefix),
            errors_only: proto.errors_only,
            min_latency_ns: proto.min_latency_usec.saturating_mul(1000),
        })
    }

    /// Whether it uses fields that only events have (key, latency).
    pub fn event_only(&self) -> bool {
        self.key_prefix.is_some() || self.min_latency_ns > 0
    }

    /// Whether the event can match on the fields it carries itself (pid, role, command), before
    /// the costlier attribution: a cheap first pass for busy Watch streams.
    fn may_match(&self, event: &CommandEvent) -> bool {
        self.pid.is_none_or(|pid| pid == event.conn.process.pid)
            && self.role.is_none_or(|role| role == event.role)
            && self.command.as_ref().is_none_or(|command| {
                event.command == *command
                    || event
                        .command
                        .strip_prefix(command.as_str())
                        .is_some_and(|rest| rest.starts_with('|'))
            })
            && (!self.errors_only || event.error.is_some())
            && event.latency_ns >= self.min_latency_ns
    }

    /// The fields a process has: pod, namespace, labels, container, pid, comm (the key's
    /// role, peer and command are not looked at).
    fn matches_process(&self, key: &RowKey, labels: &Labels) -> bool {
        let pod_ok = |pod: &PodMatch| {
            !key.pod.is_empty()
                && pod.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
                && key.pod.starts_with(&pod.prefix)
        };
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == key.namespace)
            && self.pod.as_ref().is_none_or(pod_ok)
            && self.labels.iter().all(|r| r.matches(labels))
            && self.container.as_ref().is_none_or(|c| *c == key.container)
            && self.pid.is_none_or(|pid| pid == key.pid)
            && self.comm.as_ref().is_none_or(|comm| *comm == key.comm)
    }

    /// The fields a row has: who, role and command.
    fn matches_key(&self, key: &RowKey, labels: &Labels) -> bool {
        let command_ok = |command: &String| {
            key.command == *command
                || key
                    .command
                    .strip_prefix(command.as_str())
                    .is_some_and(|rest| rest.starts_with('|'))
        };
        self.matches_process(key, labels)
            && self.role.is_none_or(|role| role == key.role)
            && self.command.as_ref().is_none_or(command_ok)
    }

    pub fn matches_event(&self, key: &RowKey, event: &CommandEvent, labels: &Labels) -> bool {
        self.matches_key(key, labels)
            && self.key_prefix.as_ref().is_none_or(|p| {
                event
                    .key
                    .as_ref()
                    .is_some_and(|k| k.starts_with(p.as_str()))
            })
            && (!self.errors_only || event.error.is_some())
            && event.latency_ns >= self.min_latency_ns
    }

    pub fn matches_row(&self, key: &RowKey, stats: &RowStats, labels: &Labels) -> bool {
        self.matches_key(key, labels)
            && (!self.errors_only || !stats.errors.is_empty() || stats.failed_calls > 0)
    }
}

/// An allow list and a deny list, within what the caller may see.
#[derive(Clone, Debug)]
pub struct FilterSet {
    allow: Vec<Filter>,
    deny: Vec<Filter>,
    scope: Scope,
}

/// Filters per list, and the encoded size of one filter: every event of a subscriber is judged
/// against all of them, so a caller cannot make that unbounded.
pub const MAX_FILTERS: usize = 32;
pub const MAX_FILTER_BYTES: usize = 4096;

impl FilterSet {
    pub fn parse(allow: &[v1::Filter], deny: &[v1::Filter]) -> Result<FilterSet, Status> {
        if allow.len() > MAX_FILTERS || deny.len() > MAX_FILTERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_FILTERS} allow and {MAX_FILTERS} deny filters"
            )));
        }
        if allow
            .iter()
            .chain(deny)
            .any(|filter| prost::Message::encoded_len(filter) > MAX_FILTER_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "a filter is at most {MAX_FILTER_BYTES} bytes"
            )));
        }
        let parse = |list: &[v1::Filter]| {
            list.iter()
                .map(Filter::parse)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(FilterSet {
            allow: parse(allow)?,
            deny: parse(deny)?,
            scope: Scope::Everything,
        })
    }

    /// Namespaces the allow filters name ("" for host processes): a caller must be allowed each.
    pub fn requested_namespaces(&self) -> BTreeSet<String> {
        self.allow
            .iter()
            .filter_map(|f| {
                f.namespace
                    .clone()
                    .or_else(|| f.pod.as_ref().and_then(|pod| pod.namespace.clone()))
            })
            .collect()
    }

    /// Limits everything from now on to what the caller may see.
    pub fn set_scope(&mut self, scope: Scope) {
        self.scope = scope;
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn event_only(&self) -> bool {
        self.allow.iter().chain(&self.deny).any(Filter::event_only)
    }

    /// False when no allow filter can match, judged on the event's own fields only.
    pub fn may_allow(&self, event: &CommandEvent) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|f| f.may_match(event))
    }

    /// Whether any filter has a label selector (labels are looked up only then).
    fn uses_labels(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|f| !f.labels.is_empty())
    }

    /// The pod's labels, when a selector needs them.
    fn labels_of(&self, key: &RowKey, attributor: &Attributor) -> Arc<Labels> {
        if self.uses_labels() {
            attributor.labels(&key.namespace, &key.pod)
        } else {
            Arc::default()
        }
    }

    pub fn allows_event(
        &self,
        key: &RowKey,
        event: &CommandEvent,
        attributor: &Attributor,
    ) -> bool {
        if !self.scope.allows(&key.namespace) {
            return false;
        }
        let labels = self.labels_of(key, attributor);
        (self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|f| f.matches_event(key, event, &labels)))
            && !self
                .deny
                .iter()
                .any(|f| f.matches_event(key, event, &labels))
    }

    /// Whether an event of the process whose attribution `key` holds may be allowed: false
    /// only when none can (the deny list is not judged here; it may still drop each event).
    pub fn may_want_process(&self, key: &RowKey, attributor: &Attributor) -> bool {
        if !self.scope.allows(&key.namespace) {
            return false;
        }
        let labels = self.labels_of(key, attributor);
        self.allow.is_empty() || self.allow.iter().any(|f| f.matches_process(key, &labels))
    }

    pub fn allows_row(&self, key: &RowKey, stats: &RowStats, attributor: &Attributor) -> bool {
        if !self.scope.allows(&key.namespace) {
            return false;
        }
        let labels = self.labels_of(key, attributor);
        (self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|f| f.matches_row(key, stats, &labels)))
            && !self.deny.iter().any(|f| f.matches_row(key, stats, &labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, pod: &str, command: &str) -> RowKey {
        RowKey {
            role: Role::Server,
            namespace: namespace.into(),
            pod: pod.into(),
            container: String::new(),
            pid: 7,
            comm: "redis-server".into(),
            peer: String::new(),
            command: command.into(),
        }
    }

    fn filter(f: v1::Filter) -> Filter {
        Filter::parse(&f).unwrap()
    }

    #[test]
    fn pod_forms() {
        let web = key("shop", "web-1", "get");
        let host = key("", "", "get");
        let pod = |p: &str| {
            filter(v1::Filter {
                pod: p.into(),
                ..Default::default()
            })
        };
        let none = Labels::new();
        assert!(pod("shop/web").matches_key(&web, &none));
        assert!(!pod("shop/api").matches_key(&web, &none));
        assert!(!pod("other/web").matches_key(&web, &none));
        assert!(pod("/web").matches_key(&web, &none));
        assert!(pod("web").matches_key(&web, &none));
        assert!(pod("shop/").matches_key(&web, &none));
        assert!(!pod("shop/").matches_key(&host, &none));
        assert!(!pod("/").matches_key(&host, &none));
        let host_only = filter(v1::Filter {
            namespace: Some(String::new()),
            ..Default::default()
        });
        assert!(host_only.matches_key(&host, &none));
        assert!(!host_only.matches_key(&web, &none));
    }

    /// What is pushed down to the pipeline judges the process only: a filter on pid, comm or
    /// namespace rules processes out; role, command, key and latency never do (they are judged
    /// per event); deny lists and an empty allow list rule nothing out; the caller's scope does.
    #[test]
    fn what_a_watcher_may_want_is_judged_on_the_process_alone() {
        let attributor = Attributor::default();
        let redis = key("shop", "redis-0", "");
        let mut other = key("", "", "");
        other.pid = 8;
        other.comm = "worker".into();
        let set = |allow: Vec<v1::Filter>, deny: Vec<v1::Filter>| {
            FilterSet::parse(&allow, &deny).unwrap()
        };
        let only = |f: v1::Filter| set(vec![f], Vec::new());
        let wants = |filters: &FilterSet, key: &RowKey| filters.may_want_process(key, &attributor);
        let pid = only(v1::Filter {
            pid: 7,
            ..Default::default()
        });
        assert!(wants(&pid, &redis));
        assert!(!wants(&pid, &other));
        let per_event = only(v1::Filter {
            comm: "redis-server".into(),
            role: v1::Role::Client as i32,
            command: "get".into(),
            key_prefix: "user:".into(),
            errors_only: true,
            min_latency_usec: 1000,
            ..Default::default()
        });
        assert!(wants(&per_event, &redis));
        assert!(!wants(&per_event, &other));
        let namespace = only(v1::Filter {
            namespace: Some("shop".into()),
            ..Default::default()
        });
        assert!(wants(&namespace, &redis));
        assert!(!wants(&namespace, &other));
        let everything_but_redis = set(
            Vec::new(),
            vec![v1::Filter {
                pid: 7,
                ..Default::default()
            }],
        );
        assert!(
            wants(&everything_but_redis, &redis),
            "deny is judged per event"
        );
        assert!(wants(&everything_but_redis, &other));
        let mut scoped = set(Vec::new(), Vec::new());
        scoped.set_scope(Scope::Namespaces(["shop".to_owned()].into()));
        assert!(wants(&scoped, &redis));
        assert!(
            !wants(&scoped, &other),
            "host processes are out of the scope"
        );
    }

    #[test]
    fn command_matches_subcommands_and_case() {
        let f = filter(v1::Filter {
            command: "CLIENT".into(),
            ..Default::default()
        });
        let none = Labels::new();
        assert!(f.matches_key(&key("", "", "client|setname"), &none));
        assert!(f.matches_key(&key("", "", "client"), &none));
        assert!(!f.matches_key(&key("", "", "clientx"), &none));
    }

    #[test]
    fn selectors() {
        let labels: Labels = [
            ("app".to_owned(), "web".to_owned()),
            ("tier".to_owned(), "fe".to_owned()),
        ]
        .into();
        let ok = |s: &str| {
            parse_selector(s)
                .unwrap()
                .iter()
                .all(|r| r.matches(&labels))
        };
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(ok("app in (web, api),tier notin (be)"));
        assert!(ok("!canary,app!=api"));
        assert!(!ok("app=api"));
        assert!(!ok("canary"));
        assert!(!ok("tier notin (fe)"));
        assert!(ok(""));
        for bad in ["app in web", "a=(b", "=x", "a b=c", "app in (x"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
        assert!(
            Filter::parse(&v1::Filter {
                labels: "a in (b".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
