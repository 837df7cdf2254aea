//! Bad input gets a clear, located, one-line cause and a non-zero exit
//! (issue #2, acceptance 5).

use std::time::Duration;

use crate::support::{Bext, Options, bext_command, client, fixture, temp_app};

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("bext: error: "))
        .collect()
}

#[test]
fn a_typo_in_the_config_is_located_and_corrected_by_check_and_run() {
    let app = temp_app(&[
        ("package.json", r#"{"main":"server.js"}"#),
        (
            "server.js",
            "require('http').createServer((q, s) => s.end('x')).listen(3000)",
        ),
        (
            "bext.config.toml",
            "[server]\nlisten = \"127.0.0.1:0\"\nstatic_dri = \"public\"\n",
        ),
    ]);
    let dir = app.path().to_str().expect("utf8");
    let config = app.path().join("bext.config.toml");
    let expected = format!(
        "bext: error: {}:3:1: key `server.static_dri`: unknown key; valid keys here: listen, static_dir, \
         upstream_timeout_ms, queue_timeout_ms, shutdown_grace_ms, client_header_timeout_ms, \
         keepalive_timeout_ms, send_timeout_ms, trusted_proxies, admin_networks, access_log, data_dir, tls; \
         did you mean `static_dir`?",
        config.display()
    );
    for args in [vec!["check", dir], vec!["run", dir]] {
        let (code, _, stderr) = bext_command(&args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert_eq!(error_lines(&stderr), [expected.as_str()], "{args:?}");
    }
    let (code, _, stderr) =
        bext_command(&["check", "--config", config.to_str().expect("utf8"), dir]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn check_reports_a_valid_config_and_the_detected_app() {
    let (code, stdout, stderr) = bext_command(&["check", fixture("hono").to_str().expect("utf8")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("no bext.config.toml; defaults apply"),
        "{stdout}"
    );
    assert!(
        stdout.contains("app 'hono': hono (package.json depends on hono), engine node"),
        "{stdout}"
    );
}

#[test]
fn a_missing_app_dir_is_one_clear_line() {
    let (code, _, stderr) = bext_command(&["run", "/nonexistent/bext-app"]);
    assert_eq!(code, 1);
    assert_eq!(
        error_lines(&stderr),
        ["bext: error: app directory /nonexistent/bext-app does not exist"]
    );
}

#[test]
fn an_app_without_a_detectable_framework_is_one_clear_line() {
    let app = temp_app(&[("README.md", "not an app")]);
    let (code, _, stderr) = bext_command(&["run", app.path().to_str().expect("utf8")]);
    assert_eq!(code, 1);
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("bext: error: no app found in "),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("set [runtime] framework"), "{}", lines[0]);
}

#[test]
fn a_failing_build_stops_bext_with_its_output_shown() {
    let app = temp_app(&[(
        "package.json",
        r#"{"name":"broken","scripts":{"build":"node -e \"console.error('BUILD-BOOM'); process.exit(2)\"","start":"node dist/server.js"}}"#,
    )]);
    let (code, _, stderr) = bext_command(&[
        "run",
        app.path().to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1, "{stderr}");
    let name = app
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        error_lines(&stderr),
        [format!("bext: error: `npm run build` failed for app '{name}' (exit status 2); its output is above").as_str()]
    );
    // The build's own output was shown live, tagged with the app.
    let shown = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["message"] == "BUILD-BOOM"
                && v["span"]["app"] == name.as_str()
                && v["span"]["phase"] == "build"
        });
    assert!(shown, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dependencies_are_installed_from_the_lockfile_when_missing() {
    let express = fixture("express");
    let app = tempfile::tempdir().expect("tempdir");
    for file in ["package.json", "package-lock.json", "server.js"] {
        std::fs::copy(express.join(file), app.path().join(file)).expect("copy");
    }
    let bext = Bext::start(
        app.path(),
        &Options {
            args: vec!["--workers".into(), "1".into()],
            ready_timeout: Duration::from_secs(180),
            ..Options::default()
        },
    );
    assert!(app.path().join("node_modules/express").is_dir());
    bext.wait_log(Duration::from_secs(1), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("running `npm ci"))
    });
    let text = client()
        .get(bext.url("/"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(text, "hello from express");
}
