//! Authorization by Kubernetes RBAC (`--authz kubernetes`), the kube-rbac-proxy model inside the
//! daemon: every call carries a bearer token, a TokenReview says whose it is, and
//! SubjectAccessReviews say in which namespaces that caller may `get pods`. Watch and GetStats
//! then show those namespaces only. Host processes (no pod) and everything else need `get pods`
//! cluster-wide (a ClusterRoleBinding), the permission that already shows every pod anyway.
//! Answers are cached for `--authz-cache-seconds`, so revoking a permission takes effect within
//! that time.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tonic::{Status, metadata::MetadataMap};

/// Cached answers at most, each kind: past that the cache starts over (callers are few; a
/// flood of made-up tokens must not grow it).
const MAX_CACHED: usize = 4096;

/// Who a token belongs to, as the TokenReview says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a caller may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace and the host's processes (no authorization, or `get pods` cluster-wide).
    Everything,
    /// Pods of these namespaces only.
    Namespaces(BTreeSet<String>),
}

impl Scope {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Scope::Everything => true,
            Scope::Namespaces(visible) => !namespace.is_empty() && visible.contains(namespace),
        }
    }

    /// Whether everything `self` showed is still shown by `now`.
    pub fn still_covered_by(&self, now: &Scope) -> bool {
        match (self, now) {
            (_, Scope::Everything) => true,
            (Scope::Everything, Scope::Namespaces(_)) => false,
            (Scope::Namespaces(before), Scope::Namespaces(after)) => before.is_subset(after),
        }
    }
}

struct Cached<T> {
    value: T,
    at: Instant,
}

/// Answers of the API server, each kept for the cache lifetime.
type Cache<K, V> = Mutex<HashMap<K, Cached<V>>>;

pub struct Authorizer {
    client: Client,
    ttl: Duration,
    /// By SHA-256 of the token: the tokens themselves are not kept.
    tokens: Cache<[u8; 32], Option<Arc<Caller>>>,
    /// Whether a caller may get pods in a namespace ("" for cluster-wide).
    access: Cache<(Arc<Caller>, String), bool>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            tokens: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
        }
    }

    /// The bearer token of a call.
    pub fn token(metadata: &MetadataMap) -> Result<String, Status> {
        metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "a bearer token is required (--authz kubernetes): redisctl sends the \
                     kubeconfig user's token, or pass --token/--token-file",
                )
            })
    }

    /// Whose token it is; UNAUTHENTICATED for a token the API server does not accept (made up,
    /// expired, revoked).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Caller>, Status> {
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| Status::internal("digest size"))?;
        if let Some(caller) = self.cached(&self.tokens, &digest) {
            return caller.ok_or_else(not_accepted);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = self.create_review("TokenReview", &review).await?;
        let caller = reviewed
            .status
            .filter(|status| status.authenticated == Some(true))
            .and_then(|status| status.user)
            .map(|user| {
                Arc::new(Caller {
                    username: user.username.unwrap_or_default(),
                    uid: user.uid.unwrap_or_default(),
                    groups: user.groups.unwrap_or_default(),
                    extra: user.extra.unwrap_or_default(),
                })
            });
        self.remember(&self.tokens, digest, caller.clone());
        caller.ok_or_else(not_accepted)
    }

    /// Whether the caller may `get pods` in `namespace` ("" for all namespaces).
    async fn may_get_pods(&self, caller: &Arc<Caller>, namespace: &str) -> Result<bool, Status> {
        let key = (Arc::clone(caller), namespace.to_owned());
        if let Some(allowed) = self.cached(&self.access, &key) {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: Some(caller.uid.clone()).filter(|uid| !uid.is_empty()),
                groups: Some(caller.groups.clone()),
                extra: Some(caller.extra.clone()).filter(|extra| !extra.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()).filter(|ns| !ns.is_empty()),
                    verb: Some("get".to_owned()),
                    resource: Some("pods".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = self.create_review("SubjectAccessReview", &review).await?;
        let allowed = reviewed.status.is_some_and(|status| status.allowed);
        self.remember(&self.access, key, allowed);
        Ok(allowed)
    }

    /// Posts a review and returns it with the API server's answer in its status.
    async fn create_review<K>(&self, what: &str, review: &K) -> Result<K, Status>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + k8s_openapi::serde::Serialize
            + k8s_openapi::serde::de::DeserializeOwned,
    {
        Api::<K>::all(self.client.clone())
            .create(&PostParams::default(), review)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "{what} failed");
                Status::unavailable(format!("authorization: {what} failed: {error}"))
            })
    }

    /// What the caller may see of `known` (the namespaces of this node's pods); every namespace
    /// in `requested` must be among it (PERMISSION_DENIED otherwise; "" names host processes).
    pub async fn scope(
        &self,
        caller: &Arc<Caller>,
        known: &BTreeSet<String>,
        requested: &BTreeSet<String>,
    ) -> Result<Scope, Status> {
        if self.may_get_pods(caller, "").await? {
            return Ok(Scope::Everything);
        }
        let mut visible = BTreeSet::new();
        for namespace in known.union(requested).filter(|ns| !ns.is_empty()) {
            if self.may_get_pods(caller, namespace).await? {
                visible.insert(namespace.clone());
            }
        }
        if let Some(denied) = requested.iter().find(|ns| !visible.contains(*ns)) {
            let what = if denied.is_empty() {
                "get pods in all namespaces, which host processes need".to_owned()
            } else {
                format!("get pods in namespace {denied:?}")
            };
            return Err(Status::permission_denied(format!(
                "{} may not {what}",
                caller.username
            )));
        }
        Ok(Scope::Namespaces(visible))
    }

    fn cached<K: Eq + std::hash::Hash, V: Clone>(&self, cache: &Cache<K, V>, key: &K) -> Option<V> {
        let cache = cache.lock().ok()?;
        cache
            .get(key)
            .filter(|entry| entry.at.elapsed() < self.ttl)
            .map(|entry| entry.value.clone())
    }

    fn remember<K: Eq + std::hash::Hash, V>(&self, cache: &Cache<K, V>, key: K, value: V) {
        if let Ok(mut cache) = cache.lock() {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(
                key,
                Cached {
                    value,
                    at: Instant::now(),
                },
            );
        }
    }
}

/// A call that passed authorization: what an open Watch needs to check its caller again.
pub struct Authorized {
    authorizer: Arc<Authorizer>,
    token: String,
    requested: BTreeSet<String>,
    checked: Instant,
}

impl Authorized {
    /// Authenticates the call's token and finds what its caller may see of `known`.
    pub async fn check(
        authorizer: &Arc<Authorizer>,
        metadata: &MetadataMap,
        known: &BTreeSet<String>,
        requested: BTreeSet<String>,
    ) -> Result<(Authorized, Scope), Status> {
        let token = Authorizer::token(metadata)?;
        let caller = authorizer.authenticate(&token).await?;
        let scope = authorizer.scope(&caller, known, &requested).await?;
        let authorized = Authorized {
            authorizer: Arc::clone(authorizer),
            token,
            requested,
            checked: Instant::now(),
        };
        Ok((authorized, scope))
    }

    /// Once per cache lifetime: the caller again, and what it may see now. A scope that lost
    /// a namespace `shown` had is PERMISSION_DENIED: a revoked permission ends the stream.
    /// `known` gives the namespaces of this node's pods, asked only when a check is due.
    pub async fn recheck(
        &mut self,
        shown: &Scope,
        known: impl FnOnce() -> BTreeSet<String>,
    ) -> Result<Option<Scope>, Status> {
        if self.checked.elapsed() < self.authorizer.ttl {
            return Ok(None);
        }
        self.checked = Instant::now();
        let caller = self.authorizer.authenticate(&self.token).await?;
        let now = self
            .authorizer
            .scope(&caller, &known(), &self.requested)
            .await?;
        if !shown.still_covered_by(&now) {
            return Err(Status::permission_denied(format!(
                "{} may no longer see everything this stream showed",
                caller.username
            )));
        }
        Ok(Some(now))
    }
}

fn not_accepted() -> Status {
    Status::unauthenticated("the Kubernetes API server did not accept the bearer token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_shows_its_namespaces_and_host_processes_only_when_everything() {
        let prod = Scope::Namespaces(BTreeSet::from(["prod".to_owned()]));
        assert!(prod.allows("prod"));
        assert!(!prod.allows("staging"));
        assert!(!prod.allows(""), "host processes need everything");
        assert!(Scope::Everything.allows(""));
        let both = Scope::Namespaces(BTreeSet::from(["prod".to_owned(), "qa".to_owned()]));
        assert!(prod.still_covered_by(&both));
        assert!(!both.still_covered_by(&prod), "a namespace was revoked");
        assert!(!Scope::Everything.still_covered_by(&both));
        assert!(prod.still_covered_by(&Scope::Everything));
    }

    #[test]
    fn a_call_without_a_bearer_token_is_unauthenticated() {
        let mut metadata = MetadataMap::new();
        assert_eq!(
            Authorizer::token(&metadata).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        metadata.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert!(Authorizer::token(&metadata).is_err());
        metadata.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(Authorizer::token(&metadata).ok().as_deref(), Some("abc"));
    }
}
