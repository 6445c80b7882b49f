//! kubectl-style filter flags, turned into a `respwatch.v1.Filter`.
use std::time::Duration;

use respwatch_proto::v1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// Applications sending commands.
    Client,
    /// Redis servers answering them.
    Server,
}

/// Who and what: shared by watch, stats and top.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// Only this Kubernetes namespace ("" for host processes). Default: all namespaces.
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// All namespaces and host processes (the default; for kubectl habits).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Pods whose name starts with this; "ns/prefix", "/prefix" and "ns/" forms work too.
    #[arg(long)]
    pub pod: Option<String>,
    /// Pod label selector, e.g. app=web,tier!=cache.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Container name (or short container id).
    #[arg(long)]
    pub container: Option<String>,
    /// Process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Process name (comm), e.g. redis-server.
    #[arg(long)]
    pub comm: Option<String>,
    /// Command, e.g. get or client|setname ("client" matches all its subcommands).
    #[arg(long)]
    pub command: Option<String>,
    /// Which side: client (apps) or server (Redis).
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// Only commands that got an error reply (rows with errors, for stats).
    #[arg(long)]
    pub errors_only: bool,
}

/// Event-only filters: watch.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EventFilterArgs {
    /// Only keys starting with this (as far as the daemon keeps key names).
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Only commands at least this slow: 500us, 5ms, 1s.
    #[arg(long, value_parser = parse_duration)]
    pub min_latency: Option<Duration>,
}

impl FilterArgs {
    pub fn to_proto(&self) -> v1::Filter {
        let pod = match (&self.pod, &self.namespace) {
            (Some(pod), Some(ns)) if !pod.contains('/') => format!("{ns}/{pod}"),
            (Some(pod), _) => pod.clone(),
            (None, _) => String::new(),
        };
        v1::Filter {
            namespace: self.namespace.clone(),
            pod,
            labels: self.selector.clone().unwrap_or_default(),
            container: self.container.clone().unwrap_or_default(),
            pid: self.pid.unwrap_or_default(),
            comm: self.comm.clone().unwrap_or_default(),
            role: match self.role {
                None => v1::Role::Unspecified,
                Some(RoleArg::Client) => v1::Role::Client,
                Some(RoleArg::Server) => v1::Role::Server,
            } as i32,
            command: self
                .command
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            key_prefix: String::new(),
            errors_only: self.errors_only,
            min_latency_usec: 0,
        }
    }
}

impl EventFilterArgs {
    pub fn apply(&self, filter: &mut v1::Filter) {
        filter.key_prefix = self.key_prefix.clone().unwrap_or_default();
        filter.min_latency_usec = self
            .min_latency
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
    }
}

/// `250us`, `5ms`, `1.5s`, `2m`, `100ns` (`µs` too). A bare number is milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 5ms, 250us, 1s"))?;
    let seconds = match unit {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" | "" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}: use ns, us, ms, s or m"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("invalid duration {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_millis(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn namespace_and_pod_combine() {
        let args = FilterArgs {
            namespace: Some("shop".into()),
            pod: Some("web".into()),
            ..Default::default()
        };
        let filter = args.to_proto();
        assert_eq!(filter.pod, "shop/web");
        assert_eq!(filter.namespace.as_deref(), Some("shop"));
    }
}
