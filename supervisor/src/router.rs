//! Virtual hosts: which app answers a `Host`.
//!
//! A trie over domain labels, read right to left (`com` → `example` →
//! `www`). A node may hold an exact app (`www.example.com`) and a wildcard
//! app (`*.example.com`: any name with one or more labels in front). An
//! exact name beats any wildcard; a longer wildcard beats a shorter one;
//! nothing matches → the default app, if any. Hosts are compared
//! case-insensitively, without port or trailing dot.
//!
//! A [`RouteTable`] is immutable: a reload builds a new one and swaps it in
//! whole, so a request sees either the old routes or the new ones.

use std::collections::HashMap;
use std::sync::Arc;

/// The routes of one moment.
#[derive(Debug)]
pub struct RouteTable<T> {
    root: Node<T>,
    default: Option<Arc<T>>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    children: HashMap<String, Node<T>>,
    exact: Option<Arc<T>>,
    wildcard: Option<Arc<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            exact: None,
            wildcard: None,
        }
    }
}

impl<T> RouteTable<T> {
    /// `routes`: (domain pattern, target); patterns are already validated
    /// and lowercase (`example.com`, `*.example.com`), and unique.
    pub fn new(
        routes: impl IntoIterator<Item = (String, Arc<T>)>,
        default: Option<Arc<T>>,
    ) -> Self {
        let mut root = Node::default();
        let mut len = 0;
        for (pattern, target) in routes {
            let (wildcard, name) = match pattern.strip_prefix("*.") {
                Some(rest) => (true, rest.to_string()),
                None => (false, pattern),
            };
            let mut node = &mut root;
            for label in name.rsplit('.') {
                node = node.children.entry(label.to_string()).or_default();
            }
            if wildcard {
                node.wildcard = Some(target);
            } else {
                node.exact = Some(target);
            }
            len += 1;
        }
        RouteTable { root, default, len }
    }

    /// Routes configured (not counting the default).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The app for a `Host` value, if any (the default app when nothing
    /// matches).
    pub fn route(&self, host: &str) -> Option<&Arc<T>> {
        self.lookup(&normalize(host)).or(self.default.as_ref())
    }

    /// The app a host matches by its domains alone (no default).
    pub fn lookup(&self, host: &str) -> Option<&Arc<T>> {
        let mut node = &self.root;
        let mut best_wildcard = None;
        let mut labels = host.rsplit('.').peekable();
        while let Some(label) = labels.next() {
            match node.children.get(label) {
                Some(child) => {
                    node = child;
                    // A wildcard here covers names with more labels in front.
                    if labels.peek().is_some() && node.wildcard.is_some() {
                        best_wildcard = node.wildcard.as_ref();
                    }
                }
                None => return best_wildcard,
            }
        }
        node.exact.as_ref().or(best_wildcard)
    }
}

/// `Example.COM:8080` → `example.com`; `[::1]:80` → `::1`.
pub fn normalize(host: &str) -> String {
    let host = host.trim();
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(ip, _)| ip)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(default: Option<&'static str>) -> RouteTable<&'static str> {
        RouteTable::new(
            [
                ("example.com", "marketing"),
                ("www.example.com", "marketing"),
                ("blog.example.com", "blog"),
                ("*.example.com", "tenants"),
                ("*.eu.example.com", "eu"),
                ("api.eu.example.com", "eu-api"),
            ]
            .map(|(d, a)| (d.to_string(), Arc::new(a))),
            default.map(Arc::new),
        )
    }

    fn route(t: &RouteTable<&'static str>, host: &str) -> Option<&'static str> {
        t.route(host).map(|a| **a)
    }

    #[test]
    fn exact_names_beat_wildcards_and_longer_wildcards_beat_shorter() {
        let t = table(None);
        assert_eq!(route(&t, "example.com"), Some("marketing"));
        assert_eq!(route(&t, "blog.example.com"), Some("blog"));
        assert_eq!(route(&t, "shop.example.com"), Some("tenants"));
        assert_eq!(route(&t, "a.b.example.com"), Some("tenants"));
        assert_eq!(route(&t, "x.eu.example.com"), Some("eu"));
        assert_eq!(route(&t, "api.eu.example.com"), Some("eu-api"));
        assert_eq!(route(&t, "eu.example.com"), Some("tenants"));
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn hosts_are_normalized() {
        let t = table(None);
        assert_eq!(route(&t, "WWW.Example.Com:8443"), Some("marketing"));
        assert_eq!(route(&t, "blog.example.com."), Some("blog"));
        assert_eq!(normalize("[::1]:80"), "::1");
    }

    #[test]
    fn unknown_hosts_get_the_default_or_nothing() {
        assert_eq!(route(&table(None), "other.org"), None);
        assert_eq!(route(&table(None), "com"), None);
        assert_eq!(route(&table(None), ""), None);
        assert_eq!(
            route(&table(Some("fallback")), "other.org"),
            Some("fallback")
        );
    }
}
