//! Prometheus metrics (SPEC 11), encoded by the prometheus-client crate.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub class: String,
    pub decision: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// Every metric moat exports. Shared by all threads (the types are atomic).
pub struct Metrics {
    /// Tells instances apart in the per-thread counter cache.
    id: u64,
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub handler_errors: Family<ClassLabel, Counter>,
    pub generation: Family<ClassLabel, Gauge>,
    pub reload_failures: Family<ClassLabel, Counter>,
    pub open_connections: Gauge,
    pub tls_leaf_cache_size: Gauge,
    pub tls_leaves_generated: Counter,
    /// `moat_node_info{node}` = 1: which node these figures are of (`[cluster] node`).
    pub node_info: Family<NodeLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        // 100 µs to ~26 s.
        let duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let handler_errors = Family::<ClassLabel, Counter>::default();
        let generation = Family::<ClassLabel, Gauge>::default();
        let reload_failures = Family::<ClassLabel, Counter>::default();
        let open_connections = Gauge::default();
        let tls_leaf_cache_size = Gauge::default();
        let tls_leaves_generated = Counter::default();
        registry.register("moat_requests", "Requests by class, decision and status", requests.clone());
        registry.register("moat_request_duration_seconds", "Time from request head to response end", duration.clone());
        registry.register(
            "moat_handler_errors",
            "Handler calls that failed (error, limit, not a Response)",
            handler_errors.clone(),
        );
        registry.register(
            "moat_policy_generation",
            "Generation number of the policy serving each class",
            generation.clone(),
        );
        registry.register(
            "moat_policy_reload_failures",
            "Reloads whose new script was rejected",
            reload_failures.clone(),
        );
        registry.register("moat_open_connections", "Client connections open now", open_connections.clone());
        registry.register(
            "moat_tls_leaf_cache_size",
            "Leaf certificates cached for TLS interception",
            tls_leaf_cache_size.clone(),
        );
        registry.register(
            "moat_tls_leaf_certificates_generated",
            "Leaf certificates made for intercepted hosts (one per cache miss)",
            tls_leaves_generated.clone(),
        );
        let node_info = Family::<NodeLabel, Gauge>::default();
        registry.register("moat_node_info", "This node's name ([cluster] node, else the host name)", node_info.clone());
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            duration,
            handler_errors,
            generation,
            reload_failures,
            open_connections,
            tls_leaf_cache_size,
            tls_leaves_generated,
            node_info,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Names the node in `moat_node_info`.
    pub fn set_node(&self, node: &str) {
        self.node_info.get_or_create(&NodeLabel { node: node.to_string() }).set(1);
    }

    /// Creates a class's per-class counters at 0, so that the first failure is an increase
    /// that `increase()`/`rate()` can see (a series that appears at 1 has no 0 before it).
    pub fn start_class(&self, class: &str) {
        let label = Self::class_label(class);
        let _ = self.handler_errors.get_or_create(&label);
        let _ = self.reload_failures.get_or_create(&label);
    }

    pub fn class_label(class: &str) -> ClassLabel {
        ClassLabel { class: class.to_string() }
    }

    /// Counts one request. The counter for a label set is looked up once per thread and then
    /// kept: the family's lookup builds owned labels and takes a lock, on every request.
    pub fn count_request(&self, class: &str, decision: &'static str, status: u16) {
        /// metrics id → class → (decision, status) → counter.
        type Cache = HashMap<u64, HashMap<String, HashMap<(&'static str, u16), Counter>>>;
        thread_local! {
            static CACHE: RefCell<Cache> = RefCell::new(HashMap::default());
        }
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            let by_name = cache.entry(self.id).or_default();
            if !by_name.contains_key(class) {
                by_name.insert(class.to_string(), HashMap::default());
            }
            let by_class = by_name.get_mut(class).expect("inserted above");
            by_class
                .entry((decision, status))
                .or_insert_with(|| {
                    let labels = RequestLabels { class: class.to_string(), decision: decision.to_string(), status };
                    self.requests.get_or_create(&labels).clone()
                })
                .inc();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn request_counts_stay_with_their_own_metrics() {
        let (a, b) = (Metrics::default(), Metrics::default());
        a.count_request("web", "egress", 200);
        a.count_request("web", "egress", 200);
        b.count_request("web", "egress", 200);
        a.count_request("web", "deny", 520);
        assert!(a.encode().contains(r#"moat_requests_total{class="web",decision="egress",status="200"} 2"#));
        assert!(a.encode().contains(r#"moat_requests_total{class="web",decision="deny",status="520"} 1"#));
        assert!(b.encode().contains(r#"moat_requests_total{class="web",decision="egress",status="200"} 1"#));
        assert!(!b.encode().contains("deny"));
    }

    #[test]
    fn class_counters_start_at_zero() {
        let m = Metrics::default();
        m.start_class("web");
        let text = m.encode();
        assert!(text.contains(r#"moat_handler_errors_total{class="web"} 0"#), "{text}");
        assert!(text.contains(r#"moat_policy_reload_failures_total{class="web"} 0"#), "{text}");
    }
}
