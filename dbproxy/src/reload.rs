//! Configuration reloads (SIGHUP): what a new configuration may change in a running proxy.
//!
//! - At once, without dropping sessions: node weights, the replication-lag limits, every
//!   health-check setting (checkers and the failover manager use them from their next check, which
//!   runs at once), and nodes appended to the end of the list (as pgpool-II allows adding backends
//!   by reload): each is a standby that gets reads once its health checks pass.
//! - For connections accepted afterwards: users, client authentication, routing, limits and TLS (a
//!   session keeps the configuration it started with).
//! - Only after a restart, kept meanwhile with a warning: an existing node's name, host and port,
//!   removing nodes, the listeners (PCP's too), `limits.max_connections`, `workers`, `state_dir`, `coordination` and the failover settings.
//!
//! [`merge`] decides without side effects, so a reload that fails validation changes nothing;
//! [`apply`] then changes the running cluster.

use common::{ConfigError, Validate};

use crate::cluster::{Cluster, MAX_NODES};
use crate::config::Config;

/// The configuration a reload to `new` results in, from the running `old` one: `new` with what
/// needs a restart kept as in `old` (each such change is logged as a warning). Errors name the
/// key when the result is not a valid configuration.
pub fn merge(old: &Config, mut new: Config) -> Result<Config, ConfigError> {
    let mut kept: Vec<String> = Vec::new();
    for (i, (o, n)) in old.nodes.iter().zip(new.nodes.iter_mut()).enumerate() {
        if (&o.name, &o.host, o.port) != (&n.name, &n.host, n.port) {
            kept.push(format!(
                "nodes.{i} stays {} at {}:{} (not {} at {}:{})",
                o.name, o.host, o.port, n.name, n.host, n.port
            ));
            n.name.clone_from(&o.name);
            n.host.clone_from(&o.host);
            n.port = o.port;
        }
    }
    if new.nodes.len() < old.nodes.len() {
        let removed: Vec<&str> = old.nodes[new.nodes.len()..]
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        kept.push(format!("nodes {} stay (removing a node)", removed.join(", ")));
        new.nodes.extend_from_slice(&old.nodes[new.nodes.len()..]);
    }
    let limit = MAX_NODES.max(old.nodes.len());
    if new.nodes.len() > limit {
        return Err(ConfigError::invalid(
            "nodes",
            format!("a reload can add nodes up to {limit} in all"),
        ));
    }
    for i in old.nodes.len()..new.nodes.len() {
        let name = &new.nodes[i].name;
        if new.nodes[..i].iter().any(|n| &n.name == name) {
            return Err(ConfigError::invalid(
                format!("nodes.{i}.name"),
                format!("`{name}` is the name of another node"),
            ));
        }
    }
    if new.listen != old.listen {
        kept.push(format!("listen stays {}", old.listen));
        new.listen.clone_from(&old.listen);
    }
    if new.admin_listen != old.admin_listen {
        kept.push(format!("admin_listen stays {}", old.admin_listen));
        new.admin_listen.clone_from(&old.admin_listen);
    }
    if new.admin_token != old.admin_token {
        kept.push("admin_token stays as it was".to_string());
        new.admin_token.clone_from(&old.admin_token);
    }
    if new.limits.max_connections != old.limits.max_connections {
        kept.push(format!(
            "limits.max_connections stays {}",
            old.limits.max_connections
        ));
        new.limits.max_connections = old.limits.max_connections;
    }
    if new.state_dir != old.state_dir {
        kept.push(format!("state_dir stays {}", old.state_dir));
        new.state_dir.clone_from(&old.state_dir);
    }
    if new.coordination != old.coordination {
        kept.push("coordination stays as it was".into());
        new.coordination = old.coordination.clone();
    }
    if new.workers != old.workers {
        kept.push(format!("workers stays {}", old.workers));
        new.workers = old.workers;
    }
    if new.pcp != old.pcp {
        kept.push("pcp stays as it was".into());
        new.pcp = old.pcp.clone();
    }
    let failover = |c: &Config| toml::to_string(&c.failover).unwrap_or_default();
    if failover(&new) != failover(old) {
        kept.push("failover stays as it was".into());
        new.failover = old.failover.clone();
    }
    let new = new.validate()?;
    if !kept.is_empty() {
        tracing::warn!(
            "reload: these changes need a restart; until then {}",
            kept.join("; ")
        );
    }
    Ok(new)
}

/// Puts what [`merge`] produced in force in `cluster`: weights, health settings and lag limits
/// change, nodes beyond the cluster's are appended. Returns the indexes of the appended nodes,
/// whose health checkers the caller starts.
pub fn apply(cluster: &Cluster, config: &Config) -> Vec<usize> {
    let mut added = Vec::new();
    for (i, n) in config.nodes.iter().enumerate() {
        if let Some(node) = cluster.nodes.get(i) {
            if node.weight() != n.weight {
                tracing::info!(node = %n.name, weight = n.weight, "reload: weight changed");
                cluster.set_weight(i, n.weight);
            }
        } else if let Some(j) = cluster.add_node(n) {
            tracing::info!(node = %n.name, host = %n.host, port = n.port, "reload: node added");
            added.push(j);
        } else {
            tracing::warn!(node = %n.name, "reload: the node table is full; node not added");
        }
    }
    cluster.set_health(&config.health);
    let r = &config.routing;
    cluster.set_lag_limits(r.max_replica_lag_bytes, r.max_replica_lag_ms);
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;

    fn config(nodes: &[(&str, u16, u32)]) -> Config {
        let mut c = Config::loopback(nodes.iter().map(|&(n, p, _)| (n, p)), None);
        for (n, &(_, _, w)) in c.nodes.iter_mut().zip(nodes) {
            n.weight = w;
        }
        c
    }

    #[test]
    fn weights_health_and_added_nodes_apply() {
        let old = config(&[("a", 1, 1), ("b", 2, 1)]);
        let mut new = config(&[("a", 1, 1), ("b", 2, 0), ("c", 3, 5)]);
        new.health.period = 7.0;
        let merged = merge(&old, new).unwrap();
        assert_eq!(merged.nodes[1].weight, 0);
        assert_eq!(merged.nodes[2].name, "c");
        assert_eq!(merged.health.period, 7.0);

        let cluster = Cluster::new(&old, &prometheus::Registry::new());
        assert_eq!(apply(&cluster, &merged), vec![2]);
        assert_eq!(cluster.nodes[1].weight(), 0);
        assert_eq!(cluster.nodes[2].weight(), 5);
        assert_eq!(cluster.health().period, 7.0);
        assert_eq!(
            apply(&cluster, &merged),
            Vec::<usize>::new(),
            "nothing added twice"
        );
    }

    #[test]
    fn what_needs_a_restart_is_kept() {
        let old = config(&[("a", 1, 1), ("b", 2, 1)]);
        let mut new = config(&[("x", 9, 1)]);
        new.listen = "127.0.0.1:1".into();
        new.admin_listen = "127.0.0.1:2".into();
        new.admin_token = "changed".into();
        new.limits.max_connections = 3;
        new.workers = 7;
        new.failover.enabled = !old.failover.enabled;
        new.pcp.listen = "127.0.0.1:3".into();
        new.pcp.users_file = "/etc/pcp.conf".into();
        let merged = merge(&old, new).unwrap();
        let names: Vec<(&str, u16)> = merged.nodes.iter().map(|n| (n.name.as_str(), n.port)).collect();
        assert_eq!(names, [("a", 1), ("b", 2)]);
        assert_eq!(merged.listen, old.listen);
        assert_eq!(merged.admin_listen, old.admin_listen);
        assert_eq!(merged.admin_token, old.admin_token);
        assert_eq!(merged.limits.max_connections, old.limits.max_connections);
        assert_eq!(merged.workers, old.workers);
        assert_eq!(merged.failover.enabled, old.failover.enabled);
        assert_eq!(merged.pcp, old.pcp);
    }

    #[test]
    fn an_added_node_needs_its_own_name() {
        let old = config(&[("a", 1, 1), ("b", 2, 1)]);
        let mut new = config(&[("a", 1, 1), ("b", 2, 1)]);
        new.nodes.push(NodeConfig {
            name: "a".into(),
            port: 3,
            ..NodeConfig::default()
        });
        let e = merge(&old, new).unwrap_err().to_string();
        assert!(e.contains("nodes.2.name"), "{e}");
    }
}
