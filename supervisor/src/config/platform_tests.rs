use std::path::Path;

use super::*;

/// The multi-app example of the deployment-modes page, as written.
pub(crate) const SEED: &str = r#"[platform]
listen = "0.0.0.0:443"
data_dir = "/var/lib/bext"
max_apps = 50
[apps.marketing]
source = "/srv/marketing"
domains = ["example.com", "www.example.com"]
runtime = "nextjs"
[apps.marketing.cache]
default_ttl = "60s"
max_entries = 10000
[apps.blog]
source = "/srv/blog"
domains = ["blog.example.com"]
runtime = "hono"
[apps.blog.cache]
default_ttl = "300s"
[apps.api]
source = "/srv/api"
domains = ["api.example.com"]
runtime = "express"
"#;

fn diag(text: &str) -> Diagnostic {
    match PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), text) {
        Err(ConfigError::Invalid(d)) => *d,
        other => panic!("expected a diagnostic, got {other:?}"),
    }
}

#[test]
fn the_seed_platform_file_parses_as_written() {
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), SEED).expect("valid");
    assert_eq!(config.listen, "0.0.0.0:443".parse().expect("addr"));
    assert_eq!(config.data_dir, Path::new("/var/lib/bext"));
    assert_eq!(config.max_apps, 50);
    let names: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["api", "blog", "marketing"]);
    let marketing = config.app("marketing").expect("marketing");
    assert_eq!(marketing.domains, ["example.com", "www.example.com"]);
    assert_eq!(marketing.runtime, Some(Framework::Nextjs));
    assert_eq!(marketing.cache.default_ttl, Some(Duration::from_secs(60)));
    assert_eq!(marketing.cache.max_entries, Some(10_000));
    assert_eq!(
        config.app("blog").expect("blog").cache.default_ttl,
        Some(Duration::from_secs(300))
    );
    assert_eq!(
        config.app("api").expect("api").runtime,
        Some(Framework::Express)
    );
}

#[test]
fn every_per_app_key_of_the_seed_table_is_accepted() {
    let text = r#"
[apps.shop]
source = "shop"
domains = ["Shop.Example.COM.", "*.shop.example.com"]
[apps.shop.rate_limit]
rpm = 600
[apps.shop.isolate]
workers = 2
memory_limit = "256mb"
[apps.shop.deploy]
keep_versions = 5
[apps.shop.hooks]
pre_build = "npm run lint"
post_deploy = "echo deployed"
timeout = "2m"
"#;
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), text).expect("valid");
    let shop = config.app("shop").expect("shop");
    assert_eq!(
        shop.source,
        Path::new("/etc/bext/shop"),
        "relative to the file"
    );
    assert_eq!(shop.domains, ["shop.example.com", "*.shop.example.com"]);
    assert_eq!(shop.rate_limit_rpm.map(|r| r.get()), Some(600));
    assert_eq!(shop.workers.map(|w| w.get()), Some(2));
    assert_eq!(shop.memory_limit, Some(MemorySize::from_bytes(256 << 20)));
    assert_eq!(shop.deploy.keep_versions, 5);
    assert_eq!(shop.hooks.pre_build.as_deref(), Some("npm run lint"));
    assert_eq!(shop.hooks.timeout, Duration::from_secs(120));
}

#[test]
fn two_apps_claiming_one_domain_is_an_error_naming_both() {
    let d = diag(
        "[apps.a]\nsource = \"/a\"\ndomains = [\"x.com\"]\n[apps.b]\nsource = \"/b\"\ndomains = [\"y.com\", \"X.com\"]\n",
    );
    assert_eq!((d.line, d.column), (6, 21));
    assert_eq!(d.key.as_deref(), Some("apps.b.domains[1]"));
    assert_eq!(
        d.message,
        "domain `x.com` is claimed by both apps `a` and `b`"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_located() {
    let d = diag("[apps.a]\nsource = \"/a\"\n[apps.a.cache]\ndefault_tll = \"60s\"\n");
    assert_eq!((d.line, d.column), (4, 1));
    assert_eq!(d.key.as_deref(), Some("apps.a.cache.default_tll"));
    assert_eq!(d.suggestion.as_deref(), Some("default_ttl"));

    let d = diag("[apps.a]\nsource = \"/a\"\n[apps.a.cache]\ndefault_ttl = \"60 parsecs\"\n");
    assert_eq!(
        (d.line, d.column, d.key.as_deref()),
        (4, 15, Some("apps.a.cache.default_ttl"))
    );
    assert!(d.message.contains("is not a duration"), "{}", d.message);

    let d = diag("[apps.a]\nsource = \"/a\"\n[apps.a.isolate]\nmemory_limit = \"256mib!\"\n");
    assert_eq!(d.key.as_deref(), Some("apps.a.isolate.memory_limit"));

    let d = diag("[platfrom]\nlisten = \"0.0.0.0:80\"\n");
    assert_eq!(d.suggestion.as_deref(), Some("platform"));

    let d = diag("[apps.a]\nsource = \"/a\"\ndomains = [\"exa mple.com\"]\n");
    assert_eq!((d.line, d.column), (3, 12));

    let d = diag("[apps.a]\ndomains = [\"a.com\"]\n");
    assert!(
        d.message.contains("missing field `source`"),
        "{}",
        d.message
    );
}

#[test]
fn max_apps_is_enforced() {
    let d =
        diag("[platform]\nmax_apps = 1\n[apps.a]\nsource = \"/a\"\n[apps.b]\nsource = \"/b\"\n");
    assert_eq!(d.line, 6);
    assert_eq!(d.message, "more apps than [platform] max_apps = 1 allows");
}

#[test]
fn the_default_app_must_exist() {
    let d = diag("[platform]\ndefault_app = \"nope\"\n[apps.a]\nsource = \"/a\"\n");
    assert_eq!(
        (d.line, d.key.as_deref()),
        (2, Some("platform.default_app"))
    );
}

#[test]
fn platform_files_are_told_apart_from_app_configs() {
    assert!(is_platform_file(SEED));
    assert!(!is_platform_file("[server]\nlisten = \"0.0.0.0:1\"\n"));
}

/// Issue 11: an app's `user` must exist; a config duration or an IPv6
/// prefix out of range is refused where it is written.
#[test]
fn users_prefixes_and_durations_are_checked_where_written() {
    let d = diag(
        "[apps.a]\nsource = \"/srv/a\"\ndomains = [\"a.test\"]\nuser = \"no-such-user-here\"\n",
    );
    assert_eq!(d.key.as_deref(), Some("apps.a.user"));
    assert_eq!(d.line, 4);
    assert!(d.message.contains("no user is named"), "{}", d.message);
    let ok = PlatformConfig::parse(
        Path::new("/etc/bext/platform.toml"),
        "[apps.a]\nsource = \"/srv/a\"\ndomains = [\"a.test\"]\nuser = \"nobody\"\n",
    )
    .expect("nobody exists");
    assert_eq!(
        ok.app("a").and_then(|a| a.user.as_ref()).map(|u| u.uid),
        Some(65534)
    );

    let d = diag(
        "[apps.a]\nsource = \"/srv/a\"\ndomains = [\"a.test\"]\n[apps.a.rate_limit]\nipv6_prefix = 129\n",
    );
    assert_eq!(d.key.as_deref(), Some("apps.a.rate_limit.ipv6_prefix"));
    assert_eq!(d.line, 5);
    let d = diag("[platform]\nkeepalive_timeout = \"100000000000s\"\n");
    assert_eq!(d.line, 2);
    assert!(d.message.contains("too long"), "{}", d.message);
    let d = diag("[platform]\n\nsend_timeout = \"0s\"\n");
    assert_eq!(
        (d.line, d.key.as_deref()),
        (3, Some("platform.send_timeout"))
    );
    assert!(d.message.contains("more than 0"), "{}", d.message);
}

/// Issue 11 (review): a tenant's own bext.config.toml cannot ask for more
/// workers, longer timeouts or a bigger cache than a tenant may; the
/// platform table can.
#[test]
fn a_tenants_own_file_cannot_raise_its_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bext.config.toml"),
        "[isolate]\nworkers = 4294967295\nstart_timeout_ms = 2000000000000\nmax_inflight = 100000\n\
         [server]\nupstream_timeout_ms = 2000000000000\nqueue_timeout_ms = 9000000\naccess_log = false\n\
         [cache.isr]\nmax_bytes = \"1tb\"\nmax_entries = 100000000\n",
    )
    .expect("write");
    let text = format!(
        "[apps.a]\nsource = \"{}\"\ndomains = [\"a.test\"]\n[apps.b]\nsource = \"{}\"\ndomains = [\"b.test\"]\n[apps.b.isolate]\nworkers = 8\n",
        dir.path().display(),
        dir.path().display()
    );
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), &text).expect("valid");
    let (a, notes) = config.app("a").expect("a").merged_config().expect("merged");
    assert_eq!(a.isolate.workers.map(|w| w.get()), Some(TENANT_MAX_WORKERS));
    assert_eq!(a.isolate.start_timeout, TENANT_MAX_START_TIMEOUT);
    assert_eq!(a.isolate.max_inflight, crate::config::DEFAULT_MAX_INFLIGHT);
    assert_eq!(a.server.upstream_timeout, TENANT_MAX_UPSTREAM_TIMEOUT);
    assert_eq!(a.server.queue_timeout, TENANT_MAX_QUEUE_TIMEOUT);
    assert_eq!(a.isr.max_bytes, crate::config::DEFAULT_ISR_MAX_BYTES);
    assert_eq!(a.isr.max_entries, crate::config::DEFAULT_ISR_MAX_ENTRIES);
    assert!(a.server.access_log, "the platform's log stays on");
    assert_eq!(notes.len(), 8, "{notes:#?}");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("isolate.workers = 4294967295")),
        "{notes:#?}"
    );
    let (b, _) = config.app("b").expect("b").merged_config().expect("merged");
    assert_eq!(
        b.isolate.workers.map(|w| w.get()),
        Some(8),
        "the platform may"
    );
}

/// Issue 13: with [platform.tls], `listen` defaults to 443, and the plain
/// listener may not take the HTTPS one's address.
#[test]
fn tls_listeners_default_and_may_not_collide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.path().join("a.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("a.key"), key.serialize_pem()).expect("key");
    let file = |platform: &str| {
        format!(
            "[platform]\n{platform}\n[apps.a]\nsource = \"/srv/a\"\ndomains = [\"a.test\"]\ntls = {{ cert = \"{0}/a.pem\", key = \"{0}/a.key\" }}\n",
            dir.path().display()
        )
    };
    let config = PlatformConfig::parse(
        Path::new("/etc/bext/platform.toml"),
        &file("[platform.tls]"),
    )
    .expect("valid");
    assert_eq!(config.listen.port(), 443);
    assert_eq!(config.tls.expect("tls").http_listen.port(), 80);
    let d = diag(&file(
        "listen = \"0.0.0.0:8080\"\n[platform.tls]\nhttp_listen = \"0.0.0.0:8080\"",
    ));
    assert_eq!(d.key.as_deref(), Some("platform.tls.http_listen"));
    assert!(d.message.contains("cannot share"), "{}", d.message);
    let d = diag("[platform]\n[platform.tls]\n[apps.a]\nsource = \"/srv/a\"\n");
    assert_eq!(d.key.as_deref(), Some("platform.tls"));
}

/// Issue 13: the seed's file (port 443, no other key) is HTTPS with
/// certificates from Let's Encrypt; `acme_email` is the one key a user adds.
#[test]
fn port_443_is_https_with_acme_certificates() {
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), SEED).expect("valid");
    let tls = config.tls.expect("port 443 is HTTPS");
    assert_eq!(tls.http_listen.port(), 80);
    assert_eq!(tls.acme.directory, crate::listener::acme::LETS_ENCRYPT);
    assert_eq!(tls.acme.email, None);
    let with_email = SEED.replace(
        "max_apps = 50\n",
        "max_apps = 50\n[platform.tls]\nacme_email = \"ops@example.com\"\n",
    );
    let config =
        PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), &with_email).expect("valid");
    assert_eq!(
        config.tls.expect("tls").acme.email.as_deref(),
        Some("ops@example.com")
    );
    // Not 443, no table: plain HTTP.
    let plain = SEED.replace("0.0.0.0:443", "0.0.0.0:8080");
    let config =
        PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), &plain).expect("valid");
    assert_eq!(config.tls, None);
}

#[test]
fn port_443_means_where_bext_really_listens() {
    let path = Path::new("/etc/bext/platform.toml");
    // `bext serve --listen 127.0.0.1:8080` of the seed: plain HTTP, no ACME.
    let elsewhere = "127.0.0.1:8080".parse().expect("addr");
    let config = PlatformConfig::parse_listening(path, SEED, Some(elsewhere)).expect("valid");
    assert_eq!(config.listen, elsewhere);
    assert_eq!(config.tls, None);
    // And `--listen 0.0.0.0:443` of a file on another port: HTTPS.
    let plain = SEED.replace("0.0.0.0:443", "0.0.0.0:8080");
    let on_443 = "0.0.0.0:443".parse().expect("addr");
    let config = PlatformConfig::parse_listening(path, &plain, Some(on_443)).expect("valid");
    assert_eq!(config.listen, on_443);
    assert!(config.tls.is_some(), "--listen on 443 is HTTPS");
}

#[test]
fn acme_keys_are_checked_where_they_are_written() {
    let file = |tls: &str, domain: &str| {
        format!(
            "[platform]\nlisten = \"127.0.0.1:8443\"\n[platform.tls]\n{tls}\n[apps.a]\nsource = \"/srv/a\"\ndomains = [\"{domain}\"]\n"
        )
    };
    for (tls, key, says) in [
        (
            "acme_email = \"not an address\"",
            "platform.tls.acme_email",
            "not an email",
        ),
        (
            "acme_email = \"a@b.com, c@d.com\"",
            "platform.tls.acme_email",
            "not an email",
        ),
        (
            "acme_directory = \"http://acme.test/dir\"",
            "platform.tls.acme_directory",
            "https://",
        ),
        (
            "acme_ca_root = \"/nonexistent/root.pem\"",
            "platform.tls.acme_ca_root",
            "/nonexistent/root.pem",
        ),
        (
            "acme_challenges = []",
            "platform.tls.acme_challenges",
            "at least one",
        ),
        (
            "acme_challenges = [\"dns-01\"]",
            "platform.tls.acme_challenges[0]",
            "dns-01",
        ),
    ] {
        let d = diag(&file(tls, "a.example.com"));
        assert_eq!(d.key.as_deref(), Some(key), "{tls}: {}", d.message);
        assert!(d.message.contains(says), "{tls}: {}", d.message);
        assert!(d.line > 0, "{tls}: located");
    }
    for domain in ["*.example.com", "localhost", "10.0.0.1"] {
        let d = diag(&file("", domain));
        assert_eq!(d.key.as_deref(), Some("apps.a.domains[0]"), "{domain}");
        assert!(
            d.message.contains("certificate of its own"),
            "{}",
            d.message
        );
    }
    let config = PlatformConfig::parse(
        Path::new("/etc/bext/platform.toml"),
        &file(
            "acme_directory = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\nacme_challenges = [\"tls-alpn-01\"]",
            "a.example.com",
        ),
    )
    .expect("valid");
    let acme = config.tls.expect("tls").acme;
    assert!(acme.directory.contains("staging"));
    assert_eq!(
        acme.challenges,
        vec![crate::listener::acme::ChallengeKind::TlsAlpn01]
    );
}

/// Issue 13: `issuer = "internal"` signs any name (wildcards, localhost, IP
/// addresses need no certificate of their own); an unknown issuer is a
/// located error.
#[test]
fn the_internal_issuer_takes_any_name() {
    let file = |issuer: &str, domain: &str| {
        format!(
            "[platform]\nlisten = \"127.0.0.1:8443\"\n[platform.tls]\nissuer = \"{issuer}\"\n[apps.a]\nsource = \"/srv/a\"\ndomains = [\"{domain}\"]\n"
        )
    };
    for domain in ["*.example.com", "localhost", "10.0.0.1", "a.example.com"] {
        let config = PlatformConfig::parse(
            Path::new("/etc/bext/platform.toml"),
            &file("internal", domain),
        )
        .unwrap_or_else(|e| panic!("{domain}: {e}"));
        assert_eq!(
            config.tls.expect("tls").acme.issuer,
            crate::listener::acme::Issuer::Internal
        );
    }
    let d = diag(&file("acme", "localhost"));
    assert_eq!(d.key.as_deref(), Some("apps.a.domains[0]"));
    let d = diag(&file("letsencrypt", "a.example.com"));
    assert_eq!(
        d.key.as_deref(),
        Some("platform.tls.issuer"),
        "{}",
        d.message
    );
    assert!(d.message.contains("internal"), "{}", d.message);
}

/// Issue 13: compression levels are the platform's; a tenant's own file may
/// only do less (turn it off, raise the minimum size).
#[test]
fn compression_levels_are_the_platforms() {
    let greedy = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        greedy.path().join("bext.config.toml"),
        "[compression]\nmin_size = \"4kb\"\nstored = { br = 11, zstd = 19 }\nstreamed = { br = 6 }\n",
    )
    .expect("write");
    let off = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        off.path().join("bext.config.toml"),
        "[compression]\nenabled = false\n",
    )
    .expect("write");
    let text = format!(
        "[platform.compression]\nstreamed = {{ br = 2 }}\n\
         [apps.a]\nsource = \"{}\"\ndomains = [\"a.test\"]\n\
         [apps.b]\nsource = \"{}\"\ndomains = [\"b.test\"]\n",
        greedy.path().display(),
        off.path().display()
    );
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), &text).expect("valid");
    assert_eq!(config.compression.streamed.br, 2);
    let (a, notes) = config.app("a").expect("a").merged_config().expect("merged");
    assert!(a.compression.enabled);
    assert_eq!(
        a.compression.min_size, 4096,
        "a larger minimum is less work"
    );
    assert_eq!(a.compression.stored, crate::compress::DEFAULT_STORED);
    assert_eq!(a.compression.streamed.br, 2);
    assert!(
        notes.iter().any(|n| n.contains("compression levels")),
        "{notes:#?}"
    );
    let (b, notes) = config.app("b").expect("b").merged_config().expect("merged");
    assert!(!b.compression.enabled);
    assert!(notes.is_empty(), "{notes:#?}");
    // A level out of range in the platform file is located.
    let err = diag("[platform.compression]\nstored = { gzip = 10 }\n");
    assert_eq!(err.line, 2);
    assert_eq!(err.key.as_deref(), Some("platform.compression.stored.gzip"));
}

/// Edge mode for every app of a platform: `[platform.redis]`, with the
/// keys of a single-app `[redis]` and errors named under the platform's.
#[test]
fn platform_redis_turns_on_edge_mode_for_every_app() {
    let text = "[platform]\nlisten = \"127.0.0.1:8080\"\n[platform.redis]\nurl = \"redis://10.0.0.9:6379/2\"\nprefix = \"fleet:\"\nwrite = \"async\"\ntimeout_ms = 80\n[apps.a]\nsource = \"/srv/a\"\n";
    let config = PlatformConfig::parse(Path::new("/etc/bext/platform.toml"), text).expect("valid");
    let redis = config.redis.expect("[platform.redis]");
    assert_eq!(redis.url, "redis://10.0.0.9:6379/2");
    assert_eq!(redis.prefix, "fleet:");
    assert_eq!(redis.write, crate::config::RedisWrite::Async);
    assert_eq!(redis.timeout, Duration::from_millis(80));
    let none = PlatformConfig::parse(Path::new("/p.toml"), SEED).expect("valid");
    assert_eq!(
        none.redis, None,
        "no table, no edge mode (REDIS_URL is bext serve's)"
    );

    let d = diag("[platform.redis]\nprefix = \"x:\"\n[apps.a]\nsource = \"/srv/a\"\n");
    assert_eq!(d.key.as_deref(), Some("platform.redis.url"));
    assert_eq!(d.line, 1);
    assert!(d.message.contains("[platform.redis]"), "{}", d.message);
    let d = diag("[platform.redis]\nurl = \"http://x\"\n[apps.a]\nsource = \"/srv/a\"\n");
    assert_eq!((d.key.as_deref(), d.line), (Some("platform.redis.url"), 2));
    let d = diag(
        "[platform.redis]\nurl = \"redis://x\"\nprefix = \"a b\"\n[apps.a]\nsource = \"/srv/a\"\n",
    );
    assert_eq!(
        (d.key.as_deref(), d.line),
        (Some("platform.redis.prefix"), 3)
    );
    // A single-app file's spelling gets a pointer to the platform's.
    let d = diag("[redis]\nurl = \"redis://x\"\n[apps.a]\nsource = \"/srv/a\"\n");
    assert_eq!((d.key.as_deref(), d.line), (Some("redis"), 1));
    assert!(d.message.contains("[platform.redis]"), "{}", d.message);
}
