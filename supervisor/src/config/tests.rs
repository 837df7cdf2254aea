use std::path::Path;

use super::*;

fn diag(text: &str) -> Diagnostic {
    match Config::parse(Path::new("bext.config.toml"), text) {
        Err(ConfigError::Invalid(d)) => *d,
        other => panic!("expected a diagnostic, got {other:?}"),
    }
}

#[test]
fn the_seed_single_app_example_parses_as_written() {
    let text = r#"
[server]
listen = "0.0.0.0:3061"
static_dir = "./dist/static"
[cache.isr]
default_ttl_ms = 60000
default_swr_ms = 3600000
"#;
    let config = Config::parse(Path::new("bext.config.toml"), text).expect("valid");
    assert_eq!(config.server.listen, "0.0.0.0:3061".parse().expect("addr"));
    assert_eq!(
        config.server.static_dir.as_deref(),
        Some(Path::new("./dist/static"))
    );
    assert_eq!(config.isr.default_ttl, Duration::from_secs(60));
    assert_eq!(config.isr.default_swr, Duration::from_secs(3600));
    assert_eq!(config.isr.max_entries, DEFAULT_ISR_MAX_ENTRIES);
}

#[test]
fn defaults_apply_without_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::load_dir(dir.path()).expect("defaults");
    assert_eq!(config.source, None);
    assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().expect("addr"));
    assert_eq!(config.isolate.workers, None);
    assert!(config.isolate.workers_or(default_workers()).get() >= 1);
    assert_eq!(config.isolate.memory_limit, None);
}

#[test]
fn a_typo_names_file_line_column_key_and_the_fix() {
    let d = diag("[server]\nlisten = \"127.0.0.1:1\"\nstatic_dri = \"x\"\n");
    assert_eq!((d.line, d.column), (3, 1));
    assert_eq!(d.key.as_deref(), Some("server.static_dri"));
    assert_eq!(d.suggestion.as_deref(), Some("static_dir"));
    let text = d.to_string();
    assert!(
        text.starts_with("bext.config.toml:3:1: key `server.static_dri`: unknown key"),
        "{text}"
    );
    assert!(text.ends_with("did you mean `static_dir`?"), "{text}");
}

#[test]
fn a_misspelt_table_is_found_too() {
    let d = diag("[isolat]\nworkers = 2\n");
    assert_eq!((d.line, d.column), (1, 2));
    assert_eq!(d.key.as_deref(), Some("isolat"));
    assert_eq!(d.suggestion.as_deref(), Some("isolate"));
}

#[test]
fn bad_values_point_at_the_value() {
    let d = diag("[isolate]\nworkers = 0\n");
    assert_eq!(
        (d.line, d.column, d.key.as_deref()),
        (2, 11, Some("isolate.workers"))
    );

    let d = diag("[isolate]\nmemory_limit = \"256xb\"\n");
    assert_eq!(d.key.as_deref(), Some("isolate.memory_limit"));
    assert!(d.message.contains("unknown size unit"), "{}", d.message);

    let d = diag("[runtime]\nengine = \"dneo\"\n");
    assert_eq!(d.suggestion.as_deref(), Some("deno"));

    let d = diag("[server]\nlisten = \"nowhere\"\n");
    assert_eq!((d.line, d.column), (2, 10));
}

#[test]
fn syntax_errors_are_located() {
    let d = diag("[server]\nlisten = \n");
    assert_eq!(d.line, 2);
    assert_eq!(d.key, None);
}

#[test]
fn memory_limit_reads_as_written_in_the_seed() {
    let config = Config::parse(
        Path::new("x.toml"),
        "[isolate]\nworkers = 3\nmemory_limit = \"256mb\"\n",
    )
    .expect("valid");
    assert_eq!(config.isolate.workers.map(|w| w.get()), Some(3));
    assert_eq!(
        config.isolate.memory_limit,
        Some(MemorySize::from_bytes(256 << 20))
    );
}

#[test]
fn line_columns_count_characters() {
    assert_eq!(diag::line_column("a\nbé c", 5), (2, 3));
}

#[test]
fn every_config_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("config-examples") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".toml") && !name.starts_with("platform") {
            Config::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} examples");
}

/// The deployment-modes page's edge example: `[redis]` as written.
#[test]
fn the_seed_edge_example_turns_on_redis() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let config = Config::load_file(&dir.join("seed-edge.toml")).expect("seed edge example");
    let redis = config.redis.expect("[redis]");
    assert_eq!(redis.url, "redis://redis.internal:6379");
    assert_eq!(redis.prefix, "bext:");
    assert_eq!(redis.write, super::RedisWrite::Sync);
    assert_eq!(redis.timeout, super::DEFAULT_REDIS_TIMEOUT);
    assert_eq!(config.isr.max_entries, 50_000);
    assert!(
        Config::parse(Path::new("bext.config.toml"), "")
            .expect("empty")
            .redis
            .is_none(),
        "off without the table"
    );
}

/// Single-app mode has `[rate_limit]` too, checked where it is written.
#[test]
fn a_rate_limit_in_the_app_file() {
    let config = Config::parse(
        Path::new("bext.config.toml"),
        "[rate_limit]\nrpm = 120\nipv6_prefix = 56\n",
    )
    .expect("valid");
    let limit = config.rate_limit.expect("limit");
    assert_eq!(limit.rpm.get(), 120);
    assert_eq!(limit.ipv6_prefix, 56);
    let config =
        Config::parse(Path::new("bext.config.toml"), "[rate_limit]\nrpm = 60\n").expect("valid");
    assert_eq!(
        config.rate_limit.map(|l| l.ipv6_prefix),
        Some(crate::ratelimit::DEFAULT_IPV6_PREFIX)
    );
    let err = Config::parse(
        Path::new("bext.config.toml"),
        "[rate_limit]\nrpm = 60\nipv6_prefix = 0\n",
    )
    .expect_err("prefix 0");
    assert!(err.to_string().contains("rate_limit.ipv6_prefix"), "{err}");
    let err =
        Config::parse(Path::new("bext.config.toml"), "[rate_limit]\nrpm = 0\n").expect_err("rpm 0");
    assert!(err.to_string().contains("rpm"), "{err}");
}

/// Multi-app mode: Redis is the platform's, never a tenant's to point bext
/// at.
#[test]
fn a_tenant_file_may_not_set_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bext.config.toml"),
        "[redis]\nurl = \"redis://10.0.0.9:6379\"\n",
    )
    .expect("write");
    let err = Config::load_tenant_dir(dir.path()).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("redis") && text.contains("platform"),
        "{text}"
    );
}

#[test]
fn the_annotated_example_states_the_real_defaults() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let example = Config::load_file(&dir.join("bext.config.toml")).expect("example");
    let defaults = Config::parse(Path::new("empty.toml"), "").expect("defaults");
    assert_eq!(example.server, defaults.server);
    assert_eq!(example.isr, defaults.isr);
    assert_eq!(example.runtime, defaults.runtime);
    assert_eq!(example.isolate, defaults.isolate);
    assert_eq!(example.compression, defaults.compression);
    assert_eq!(defaults.compression, crate::compress::Settings::default());
}

#[test]
fn compression_levels_are_checked_where_they_are_written() {
    let text = "[compression]\nstored = { zstd = 15, br = 12 }\n";
    let err = Config::parse(Path::new("bext.config.toml"), text).expect_err("br 12");
    let message = err.to_string();
    assert!(message.contains("bext.config.toml:2:"), "{message}");
    assert!(message.contains("compression.stored.br"), "{message}");
    assert!(message.contains("0 to 11"), "{message}");
    // Streamed levels are paid per response: the top ones are refused.
    let err = Config::parse(
        Path::new("bext.config.toml"),
        "[compression]\nstreamed = { zstd = 12 }\n",
    )
    .expect_err("zstd 12 streamed");
    assert!(err.to_string().contains("1 to 9"), "{err}");
    let ok = Config::parse(
        Path::new("bext.config.toml"),
        "[compression]\nmin_size = \"2kb\"\nstreamed = { gzip = 1 }\n",
    )
    .expect("valid");
    assert_eq!(ok.compression.min_size, 2048);
    assert_eq!(ok.compression.streamed.gzip, 1);
    assert_eq!(
        ok.compression.streamed.br,
        crate::compress::DEFAULT_STREAMED.br
    );
}

#[test]
fn the_platform_examples_parse_and_one_is_the_seed_exactly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let seed = std::fs::read_to_string(dir.join("platform.toml")).expect("platform.toml");
    assert_eq!(
        seed,
        super::platform::tests::SEED,
        "config-examples/platform.toml is the seed as written"
    );
    for file in ["platform.toml", "platform.annotated.toml"] {
        super::platform::PlatformConfig::load(&dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// Issue 11 (review): an app's config that is a FIFO, a device or huge is
/// refused at once, not blocked on or read without end.
#[test]
fn config_files_must_be_small_regular_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("bext.config.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let err = Config::load_dir(dir.path()).expect_err("a FIFO");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    std::fs::remove_file(&fifo).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &fifo).expect("symlink");
    let err = Config::load_dir(dir.path()).expect_err("/dev/zero");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    std::fs::remove_file(&fifo).expect("rm");
    std::fs::write(&fifo, vec![b'#'; (MAX_FILE_BYTES + 10) as usize]).expect("write");
    let err = Config::load_dir(dir.path()).expect_err("too big");
    assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
}

/// A tenant's `bext.config.toml` that is a symlink is refused in
/// multi-app mode (it could point bext at another tenant's file or at its
/// own environment); in single-app mode the operator's symlink is followed.
#[test]
fn a_tenant_config_may_not_be_a_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real.toml");
    std::fs::write(&real, "[server]\nlisten = \"127.0.0.1:4100\"\n").expect("write");
    std::os::unix::fs::symlink(&real, dir.path().join("bext.config.toml")).expect("symlink");
    let config = Config::load_dir(dir.path()).expect("followed in single-app mode");
    assert_eq!(config.server.listen.port(), 4100);
    let err = Config::load_tenant_dir(dir.path()).expect_err("a symlink");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    std::fs::remove_file(dir.path().join("bext.config.toml")).expect("rm");
    std::fs::rename(&real, dir.path().join("bext.config.toml")).expect("mv");
    let config = Config::load_tenant_dir(dir.path()).expect("a regular file");
    assert_eq!(config.server.listen.port(), 4100);
}

/// Issue 13: `[server.tls]` is read and checked with the file: the pair,
/// the domains it must cover, plain HTTP's own address; in a tenant's
/// file (multi-app mode) it is refused before any file it names is read.
#[test]
fn server_tls_is_checked_when_the_file_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["site.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.path().join("site.pem"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("site.key"), key.serialize_pem()).expect("write");
    let file = dir.path().join("bext.config.toml");
    let parse = |text: &str| Config::parse(&file, text);
    // Relative paths are the config file's.
    let ok = parse("[server.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\ndomains = [\"Site.Test\"]\nhsts = \"1y\"\n")
        .expect("valid");
    let tls = ok.server.tls.expect("tls");
    assert_eq!(
        tls.files,
        Some((dir.path().join("site.pem"), dir.path().join("site.key")))
    );
    assert_eq!(tls.domains, ["site.test"]);
    assert_eq!(
        ok.server.listen.port(),
        443,
        "HTTPS listens on 443 unless told"
    );
    assert_eq!(tls.http_listen.port(), 80);
    let err = parse(
        "[server.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\ndomains = [\"other.test\"]\n",
    )
    .expect_err("not covered")
    .to_string();
    assert!(err.contains(":4:"), "{err}");
    assert!(err.contains("server.tls.domains[0]"), "{err}");
    assert!(err.contains("does not cover `other.test`"), "{err}");
    let err = parse("[server.tls]\ncert = \"missing.pem\"\nkey = \"site.key\"\n")
        .expect_err("no file")
        .to_string();
    assert!(err.contains("server.tls.cert"), "{err}");
    let err = parse("[server]\nlisten = \"0.0.0.0:8443\"\n[server.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\nhttp_listen = \"0.0.0.0:8443\"\n")
        .expect_err("one address for both")
        .to_string();
    assert!(err.contains("server.tls.http_listen"), "{err}");
    // Without cert and key: automatic certificates for the domains,
    // which must be names a public CA issues for (any, with the internal
    // issuer); one of cert and key alone is an error.
    let auto = parse("[server]\ndata_dir = \"state\"\n[server.tls]\ndomains = [\"www.site.test\"]\nacme_email = \"ops@site.test\"\n")
        .expect("automatic");
    let tls = auto.server.tls.expect("tls");
    assert_eq!(tls.files, None);
    assert_eq!(tls.acme.email.as_deref(), Some("ops@site.test"));
    assert_eq!(auto.server.data_dir, Some(dir.path().join("state")));
    for (text, key, says) in [
        ("[server.tls]\n", "server.tls.domains", "name the domains"),
        (
            "[server.tls]\ndomains = [\"localhost\"]\n",
            "server.tls.domains[0]",
            "cert and key",
        ),
        (
            "[server.tls]\ndomains = [\"a.site.test\"]\nacme_directory = \"http://x.test/\"\n",
            "server.tls.acme_directory",
            "https://",
        ),
        (
            "[server.tls]\ncert = \"site.pem\"\ndomains = [\"site.test\"]\n",
            "server.tls.key",
            "both",
        ),
        (
            "[server.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\nacme_email = \"a@site.test\"\n",
            "server.tls.acme_email",
            "no effect",
        ),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(key) && err.contains(says), "{text}: {err}");
    }
    let internal =
        parse("[server.tls]\nissuer = \"internal\"\ndomains = [\"localhost\", \"*.dev.test\"]\n")
            .expect("any name with the internal CA");
    assert_eq!(
        internal.server.tls.expect("tls").acme.issuer,
        crate::listener::acme::Issuer::Internal
    );
    // A tenant's file may not name certificate files.
    std::fs::write(
        &file,
        "[server.tls]\ncert = \"/etc/shadow\"\nkey = \"/etc/shadow\"\n",
    )
    .expect("write");
    let err = Config::load_tenant_dir(dir.path())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("server.tls"), "{err}");
    assert!(err.contains("[apps.NAME.tls]"), "{err}");
}
